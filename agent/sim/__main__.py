"""``python -m fleet.agent.sim``: one simulated vLLM engine (see :mod:`fleet.agent.sim.cli`)."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
