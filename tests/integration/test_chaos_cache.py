"""The chaos suite's ``response-cache-redis-down`` against ``fleet up --engine sim
--response-cache redis://...`` with a real redis-server of its own (tests/redisserver.py),
stopped (SIGSTOP) under load and continued. The figures are printed (chaos/README.md has one
run's)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx

from fleet.chaos import ChaosConfig, connect, run

from ..redisserver import RedisServer
from .fleetproc import FleetProcess, alive

REPLICAS = 2


async def test_redis_down_under_load_every_request_served_and_hits_resume(
    demo_model: Path, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path).start()
    args = ["--engine", "sim", "--replicas", str(REPLICAS), "--model", str(demo_model),
            "--response-cache", server.url]  # fmt: skip
    proc = FleetProcess(args, tmp_path / "logs")
    pids: set[int] = set()
    try:
        proc.wait_for(r"Fleet is serving `demo`", 120)
        proc.wait_ready(REPLICAS, 60)
        async with httpx.AsyncClient() as http:
            target = await connect(proc.url, http)
            figures = await run("response-cache-redis-down", target, ChaosConfig())
    finally:
        pids = proc.descendants()
        if proc.proc.poll() is None:
            proc.stop(signal.SIGTERM)
        server.stop()
    print("\n" + json.dumps(figures))
    assert figures["missed"] == [], json.dumps(figures, indent=1)
    assert figures["sent"] >= 20 and figures["succeeded"] == figures["sent"]
    assert figures["sent_during_outage"] > 0
    assert figures["served_during_outage"] == figures["sent_during_outage"]
    assert not alive(pids), f"left running: {sorted(alive(pids))}"
