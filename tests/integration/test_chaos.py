"""The chaos suite against a real ``fleet up --engine sim`` fleet: every scenario meets its
targets (:func:`fleet.chaos.scenarios.missed`: nothing lost or broken; nothing failed where a
healthy engine was left, except an overload's 503s with Retry-After at >= 90% goodput; the
scenario's own checks).

One fleet of simulators serves every scenario in turn (each starts by waiting until all engines
are ready). The simulators hold 128 KV blocks each, so the kv-events load evicts blocks and the
index's removals are checked too. Their decode step grows in proportion to the batch
(``--sim-decode-batch-slope=1.0``: a fixed token throughput per engine), so the engines, not the
coordinator, bound the fleet's capacity, as GPUs do: the overload burst measures shedding, not
how fast one Python process on a shared 2-core machine can refuse connections.
"""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fleet.chaos import ChaosConfig, connect, run, scenarios

from .fleetproc import FleetProcess, alive

REPLICAS = 6


@pytest.fixture(scope="module")
def chaos_fleet(
    demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FleetProcess]:
    log_dir = tmp_path_factory.mktemp("chaos-fleet-logs")
    args = ["--engine", "sim", "--replicas", str(REPLICAS), "--model", str(demo_model)]
    sims = ["--engine-arg=--sim-num-blocks=128", "--engine-arg=--sim-decode-batch-slope=1.0"]
    proc = FleetProcess([*args, *sims], log_dir)
    pids: set[int] = set()
    try:
        proc.wait_for(r"Fleet is serving `demo`", 120)
        proc.wait_ready(REPLICAS, 60)
        yield proc
    finally:
        pids = proc.descendants()
        if proc.proc.poll() is None:
            proc.stop(signal.SIGTERM)
    assert not alive(pids), f"left running: {sorted(alive(pids))}"


@pytest.mark.parametrize("name", [n for n, s in scenarios().items() if s.nodes == 1])
async def test_scenario_meets_its_targets(chaos_fleet: FleetProcess, name: str) -> None:
    async with httpx.AsyncClient() as http:
        target = await connect(chaos_fleet.url, http)
        figures = await run(name, target, ChaosConfig())
    assert figures["missed"] == [], json.dumps(figures, indent=1)


def test_fleet_chaos_run_writes_json_and_a_table(chaos_fleet: FleetProcess, tmp_path: Path) -> None:
    from fleet.cli import main

    out = tmp_path / "stdout.json"
    argv = ["chaos", "run", "malformed-wire", "--coordinator", chaos_fleet.url]
    with open(out, "w") as f, contextlib.redirect_stdout(f), pytest.raises(SystemExit) as done:
        main([*argv, "--out", str(tmp_path / "results"), "-o", "json"])
    printed = json.loads(out.read_text())
    assert done.value.code == (0 if not printed["results"][0]["missed"] else 1)
    assert printed["results"][0]["scenario"] == "malformed-wire"
    written = sorted(p.name for p in (tmp_path / "results").iterdir())
    assert written == ["malformed-wire.json", "summary.json", "summary.md"]
    assert (tmp_path / "results" / "summary.md").read_text().startswith("| scenario |")
