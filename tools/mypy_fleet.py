"""Type-check the ``fleet`` package from the repository's folders, as setuptools installs it.

pyproject.toml's ``[tool.setuptools] package-dir`` installs agent/, coordinator/, ... as
``fleet.agent``, ``fleet.coordinator``, ...; mypy names a file's module after its folders only,
and the editable install's finder is an import hook that mypy does not run. So this script names
each file's module itself, from that mapping (mypy's ``BuildSource(path, module)``), and runs
mypy over all of them with pyproject.toml's ``[tool.mypy]`` settings plus any flags given::

    python tools/mypy_fleet.py [mypy flags]

A folder under a package that holds modules but is missing from ``packages`` is an error:
an install would leave it out. Exit status as mypy's: 0 clean, 1 type errors, 2 blocking errors.

``mypy.api`` takes only command-line arguments, which cannot name a file's module, so this calls
``mypy.main.process_options`` and ``mypy.build.build``, the entry points mypyc drives mypy
through. They are outside mypy's documented API: a release that changes them fails here loudly.
"""

from __future__ import annotations

import os
import sys
import tomllib
from collections.abc import Mapping, Sequence, Sized
from pathlib import Path

from mypy.build import build
from mypy.errors import CompileError
from mypy.fscache import FileSystemCache
from mypy.main import process_options
from mypy.modulefinder import BuildSource

ROOT = Path(__file__).resolve().parents[1]


def package_folder(package: str, package_dir: Mapping[str, str]) -> Path:
    """Return the folder setuptools installs ``package`` from.

    setuptools' rule: the longest dotted prefix of ``package`` listed in ``package_dir`` maps to
    its folder, and the remaining components are subfolders of it.
    """
    parts = package.split(".")
    for n in range(len(parts), -1, -1):
        prefix = ".".join(parts[:n])
        if prefix in package_dir:
            return Path(package_dir[prefix], *parts[n:])
    return Path(*parts)


def package_sources(root: Path) -> list[BuildSource]:
    """Return one mypy source per module of ``[tool.setuptools] packages``, paths relative to root.

    Raises:
        ValueError: ``packages`` or ``package-dir`` is malformed, a package's folder has no
            ``__init__.py``, or a subfolder with modules is not listed in ``packages``.
    """
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = setup.get("packages")
    package_dir = setup.get("package-dir", {})
    if not isinstance(packages, list) or not all(isinstance(p, str) for p in packages):
        raise ValueError("[tool.setuptools] packages: expected a list of package names")
    if not isinstance(package_dir, dict):
        raise ValueError("[tool.setuptools] package-dir: expected a table")
    listed = set(packages)
    sources: list[BuildSource] = []
    for package in sorted(listed):
        folder = package_folder(package, package_dir)
        if not (root / folder / "__init__.py").is_file():
            raise ValueError(f"[tool.setuptools] packages: {package}: no {folder}/__init__.py")
        for path in sorted((root / folder).glob("*.py")):
            module = package if path.stem == "__init__" else f"{package}.{path.stem}"
            sources.append(BuildSource(str(folder / path.name), module))
        for sub in sorted((root / folder).iterdir()):
            listable = sub.name.isidentifier() and any(sub.glob("*.py"))  # not .venv/, say
            if listable and f"{package}.{sub.name}" not in listed:
                raise ValueError(
                    f"[tool.setuptools] packages: {folder / sub.name}/ holds modules but "
                    f"{package}.{sub.name} is not listed, so an install leaves it out"
                )
    return sources


def main(argv: Sequence[str]) -> int:
    """Run mypy over every module of the package; return mypy's exit status."""
    os.chdir(ROOT)  # pyproject.toml's [tool.mypy], and paths in messages relative to the root
    try:
        sources = package_sources(ROOT)
    except (ValueError, KeyError) as exc:
        print(f"tools/mypy_fleet.py: pyproject.toml: {exc}", file=sys.stderr)
        return 2
    fscache = FileSystemCache()
    targets, options = process_options(list(argv), require_targets=False, fscache=fscache)
    if targets:
        print("tools/mypy_fleet.py: takes mypy flags only; it checks every module", file=sys.stderr)
        return 2
    errors: list[str] = []

    def flush(path: str | None, messages: list[str], serious: bool) -> None:
        for message in messages:
            print(message, file=sys.stderr if serious else sys.stdout)
            if ": error:" in message:
                errors.append(message.split(":", 1)[0])

    try:
        build(sources, options, fscache=fscache, flush_errors=flush)
    except CompileError:
        print(f"Found {_count(errors, 'error')} (errors prevented further checking)")
        return 2
    if errors:
        found = f"{_count(errors, 'error')} in {_count(set(errors), 'file')}"
        print(f"Found {found} (checked {len(sources)} source files)")
        return 1
    print(f"Success: no issues found in {len(sources)} source files")
    return 0


def _count(items: Sized, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


if __name__ == "__main__":
    status = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown, as mypy's own CLI does (fast_exit): freeing the trees of
    # the ~10,000 modules it loaded takes about as long as a cold check.
    os._exit(status)
