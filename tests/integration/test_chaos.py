"""The chaos suite against a real ``fleet up --engine sim`` fleet: every scenario meets its
targets (:func:`fleet.chaos.scenarios.missed`: nothing lost or broken; nothing failed where a
healthy engine was left, except an overload's 503s with Retry-After at >= 90% goodput; the
scenario's own checks).

One fleet of simulators serves every scenario in turn (each starts by waiting until all engines
are ready). The simulators hold 128 KV blocks each, so the kv-events load evicts blocks and the
index's removals are checked too. Their decode step grows in proportion to the batch
(``--sim-decode-batch-slope=1.0``: a fixed token throughput per engine), so the engines, not the
coordinator, bound the fleet's capacity, as GPUs do: the overload burst measures shedding, not
how fast one Python process on a shared 2-core machine can refuse connections. Two settings keep
it so (measured on this 2-core machine, overload scenario):

- 16 ms a decode step per sequence, not the default 8: six engines then serve ~46 req/s, so the
  10x burst is ~460 req/s. At 8 ms (~90 req/s, a ~900 req/s burst) the coordinator process spent
  9.6 s of CPU in 13.4 s serving the burst, completions ran at ~30% of capacity for the burst's
  first 2 s while it worked through the arrivals, and goodput was 0.84-0.93 of capacity.
- 8 slots per engine (``--engine-slots 8``): an engine whose throughput does not grow with its
  batch gains nothing from more requests in flight; with the default 64 each engine held
  64 x 8 tokens x 16 ms = 8 s of work committed to it, and under a one-core CPU hog some
  requests then missed their deadline at the engine (504 after engine time spent for nothing)
  instead of being shed from the queue with 503 (4 runs of 5 missed a target).

With both (and the admission's deadline bound, :class:`fleet.coordinator.admission.WaitEstimate`):
goodput 1.03-1.15 of capacity in 4 runs, 1.005-1.12 in 5 runs beside a one-core CPU hog, every
failure a 503.
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
    sims = [
        "--engine-slots=8",
        "--engine-arg=--sim-num-blocks=128",
        "--engine-arg=--sim-decode-batch-slope=1.0",
        "--engine-arg=--sim-decode-ms-per-token=16",
    ]
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


@pytest.mark.parametrize(
    "name",
    [
        n
        for n, s in scenarios().items()
        # rogue-agent: test_chaos_curve.py; response-cache-redis-down: test_chaos_cache.py
        if s.nodes == 1 and s.coordinators == 1 and s.link != "curve" and not s.cache
    ],
)
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
