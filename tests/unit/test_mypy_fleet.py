"""tools/mypy_fleet.py names each file's module as the installed package imports it."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool() -> ModuleType:
    pytest.importorskip("mypy")  # the `dev` extra
    spec = importlib.util.spec_from_file_location("mypy_fleet", ROOT / "tools" / "mypy_fleet.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_module_is_named_as_python_imports_it() -> None:
    sources = _tool().package_sources(ROOT)
    assert len({s.module for s in sources}) == len(sources)
    for source in sources:
        spec = importlib.util.find_spec(source.module)
        assert spec is not None and spec.origin is not None, source.module
        assert Path(spec.origin).resolve() == (ROOT / source.path).resolve(), source.module
    in_packages = {  # every module under a folder with an __init__.py, as `mypy -p` finds them
        path
        for folder in ("fleet", "agent", "coordinator", "protocol", "bench", "chaos")
        for path in (ROOT / folder).rglob("*.py")
        if all(
            (d / "__init__.py").is_file() for d in path.parents if d.is_relative_to(ROOT / folder)
        )
    }
    assert {ROOT / s.path for s in sources} == in_packages


def _project(root: Path, packages: str) -> None:
    (root / "pyproject.toml").write_text(
        f'[tool.setuptools]\npackage-dir = {{ "top" = "src", "top.sub" = "lib" }}\n'
        f"packages = {packages}\n"
    )
    for folder in ("src", "lib", "lib/inner"):
        (root / folder).mkdir()
        (root / folder / "__init__.py").write_text("")
    (root / "lib" / "inner" / "deep.py").write_text("")


def test_package_dir_prefixes_map_to_folders(tmp_path: Path) -> None:
    _project(tmp_path, '["top", "top.sub", "top.sub.inner"]')
    sources = _tool().package_sources(tmp_path)
    assert [(s.path, s.module) for s in sources] == [
        ("src/__init__.py", "top"),
        ("lib/__init__.py", "top.sub"),
        ("lib/inner/__init__.py", "top.sub.inner"),
        ("lib/inner/deep.py", "top.sub.inner.deep"),
    ]


def test_a_folder_missing_from_packages_is_an_error(tmp_path: Path) -> None:
    _project(tmp_path, '["top", "top.sub"]')
    with pytest.raises(ValueError, match=r"lib/inner/ holds modules but top\.sub\.inner"):
        _tool().package_sources(tmp_path)
