"""The layout rules of shared/STYLE.md, enforced: protocol imports nothing of Fleet's, and the
agent and the coordinator never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "protocol": ("fleet.agent", "fleet.coordinator", "fleet.bench", "fleet.cli", "fleet.up"),
    "agent": ("fleet.coordinator",),
    "coordinator": ("fleet.agent",),
    "chaos": ("fleet.agent", "fleet.coordinator"),  # it drives a fleet from outside
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_boundaries(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in _imports(path)
        if name.startswith(FORBIDDEN[package])
    ]
    assert not bad, bad
