"""Fixtures shared by every test: the demo model, built once per session (offline, ~5 s)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight Llama every real-engine test serves."""
    from fleet.demomodel import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("models") / "demo")
