"""The chaos suite's ``rogue-agent`` against a CURVE-protected ``fleet up --coordinators 2``.

Two coordinator processes (each given ``DIR/coordinator`` of ``fleet keys generate DIR`` by
``fleet up``) and the local agent (``DIR/agent``) on simulated engines; four rogue agents
without the key try to register, heartbeat, impersonate the live node and send KV events while
a load runs (chaos/rogue_agent.py): every one is refused and counted, nothing of theirs reaches
the fleet, no request fails. The figures are printed (chaos/README.md has one run's).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fleet.chaos import ChaosConfig, connect, run
from fleet.chaos.errors import ChaosError
from fleet.protocol.curve import curve_available, generate_keys, load_server_keys

from .fleetproc import FleetProcess, alive

pytestmark = pytest.mark.skipif(not curve_available(), reason="libzmq without CURVE")
REPLICAS = 2


@pytest.fixture(scope="module")
def curve_fleet(
    demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[FleetProcess, Path]]:
    keys = tmp_path_factory.mktemp("keys")
    generate_keys(keys)
    log_dir = tmp_path_factory.mktemp("curve-fleet-logs")
    args = ["--engine", "sim", "--replicas", str(REPLICAS), "--model", str(demo_model),
            "--coordinators", "2", "--curve-keys", str(keys)]  # fmt: skip
    proc = FleetProcess(args, log_dir)
    pids: set[int] = set()
    try:
        proc.wait_for(r"Fleet is serving `demo`", 120)
        proc.wait_ready(REPLICAS, 60)
        yield proc, keys
    finally:
        pids = proc.descendants()
        if proc.proc.poll() is None:
            proc.stop(signal.SIGTERM)
    assert not alive(pids), f"left running: {sorted(alive(pids))}"


async def test_rogue_agents_are_refused_and_the_fleet_does_not_notice(
    curve_fleet: tuple[FleetProcess, Path],
) -> None:
    proc, keys = curve_fleet
    async with httpx.AsyncClient() as http:
        target = await connect(proc.url, http)
        assert target.agent_curve_key == load_server_keys(keys / "coordinator").public.decode()
        figures = await run("rogue-agent", target, ChaosConfig())
    print("\n" + json.dumps({k: v for k, v in figures.items() if k != "examples"}))
    assert figures["missed"] == [], json.dumps(figures, indent=1)
    assert figures["sent"] >= 10 and figures["succeeded"] == figures["sent"]


async def test_malformed_wire_says_why_it_cannot_run_on_a_curve_link(
    curve_fleet: tuple[FleetProcess, Path],
) -> None:
    proc, _ = curve_fleet
    async with httpx.AsyncClient() as http:
        target = await connect(proc.url, http)
        with pytest.raises(ChaosError, match="CURVE-protected"):
            await run("malformed-wire", target, ChaosConfig())
