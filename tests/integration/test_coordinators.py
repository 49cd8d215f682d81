"""``fleet up --coordinators 2`` on simulated engines: two coordinator processes behind one
port, one leading placement; the chaos suite's ``coordinator-kill`` SIGKILLs the leader under
load.

Requests sent once the leader's process is gone are all served (the survivor takes every new
connection), the survivor leads, the killed coordinator is started again, and no engine is
placed twice or restarted (chaos/coordinators.py has the figures)."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import httpx
import pytest

from fleet.chaos import ChaosConfig, connect, run

from .fleetproc import FleetProcess

pytestmark = pytest.mark.engine

MODEL = "demo"


def _lock_pid(lock: Path) -> int:
    """The leader's pid, as its lock file says (``coord-N pid P``)."""
    match = re.fullmatch(r"coord-\d+ pid (\d+)\n", lock.read_text())
    assert match, lock.read_text()
    return int(match.group(1))


async def test_the_leaders_sigkill_loses_no_request_sent_after_it(
    demo_model: Path, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    args = ["--model", str(demo_model), "--engine", "sim", "--replicas", "2", "--coordinators", "2"]
    proc = FleetProcess(args, logs)
    try:
        proc.wait_for(rf"Fleet is serving `{MODEL}`", 120)
        proc.wait_ready(2, 60)
        leader = _lock_pid(logs / "leader.lock")
        async with httpx.AsyncClient() as http:
            target = await connect(proc.url, http)
            figures = await run("coordinator-kill", target, ChaosConfig())
        print("\n" + json.dumps({k: v for k, v in figures.items() if k != "examples"}))
        assert figures["missed"] == [], json.dumps(figures, indent=1)
        assert figures["coordinators"] == 2 and figures["sent"] >= 10
        assert figures["restarted_s"] is not None
        assert _lock_pid(logs / "leader.lock") != leader
        # Placement happened once per engine, by whichever coordinator led at the start.
        assigned = [line for line in proc.lines if "assigning " in line]
        assert len(assigned) == 2, assigned
    finally:
        proc.stop(signal.SIGTERM)
