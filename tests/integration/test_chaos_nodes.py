"""Chaos across processes: a coordinator and two agents (``fleet coordinator`` + 2 × ``fleet
agent``, simulated engines), for the faults a one-process ``fleet up`` cannot have.

1. The coordinator is SIGKILLed under load and started again on the same ports: no engine
   restarts, every engine is routable again, and the KV index equals the engines' own caches
   without any new traffic (the agents' snapshots), timed from the new coordinator's start.
2. ``agent-kill`` (the chaos scenario): one node's agent SIGKILLed under load; its engines die
   with it, their streams and requests move, the node's engines are placed on the other node.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from fleet.agent.launcher import free_port
from fleet.chaos import ChaosConfig, ChaosError, connect, run
from fleet.chaos.kvcheck import compare
from fleet.chaos.load import background, run_clock
from fleet.chaos.outcomes import figures
from fleet.chaos.scenarios import load_spec

from .fleetproc import alive

REPLICAS = 4
SIMS = ["--engine-arg=--sim-num-blocks=128", "--engine-arg=--sim-decode-batch-slope=1.0"]


@dataclass
class Topology:
    """The processes, their logs, and how to start the coordinator again."""

    logs: Path
    url: str
    coordinator_argv: list[str]
    coordinator: subprocess.Popen[bytes]
    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start_coordinator(self) -> None:
        with open(self.logs / "coordinator.out", "ab") as out:
            self.coordinator = subprocess.Popen(
                self.coordinator_argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def engines(self) -> list[dict[str, object]]:
        engines = httpx.get(self.url + "/api/v1/engines", timeout=10).json()["engines"]
        return sorted(engines, key=lambda e: str(e["id"]))

    def wait(self, what: str, check: object, timeout_s: float = 60.0) -> float:
        """Poll ``check()`` until true; the seconds it took."""
        started = time.monotonic()
        while True:
            try:
                if check():  # type: ignore[operator]
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            if time.monotonic() - started > timeout_s:
                tail = (self.logs / "coordinator.out").read_text(errors="replace")[-3000:]
                raise AssertionError(f"{what} not within {timeout_s} s; coordinator:\n{tail}")
            time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def topology(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    logs = tmp_path_factory.mktemp("chaos-nodes")
    port, link = free_port(), f"tcp://127.0.0.1:{free_port()}"
    fleet = [sys.executable, "-m", "fleet"]
    argv = [*fleet, "coordinator", "--port", str(port), "--agent-endpoint", link]
    argv += ["--model", str(demo_model), "--engine", "sim", "--replicas", str(REPLICAS), *SIMS]
    argv += ["--log-dir", str(logs / "coordinator")]
    top = Topology(logs, f"http://127.0.0.1:{port}", argv, None)  # type: ignore[arg-type]
    top.start_coordinator()
    try:
        for node in ("a", "b"):
            with open(logs / f"agent-{node}.out", "ab") as out:
                top.agents[node] = subprocess.Popen(
                    [*fleet, "agent", "--coordinator", link, "--node-id", node, "--http-port",
                     "0", "--log-dir", str(logs / node)],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
        top.wait(
            "4 ready engines on two nodes",
            lambda: (
                [e["state"] for e in top.engines()] == ["ready"] * REPLICAS
                and {e["node"] for e in top.engines()} == {"a", "b"}
            ),
            120,
        )
        yield top
    finally:
        pids: set[int] = set()
        for proc in [top.coordinator, *top.agents.values()]:
            pids |= {p for p in _descendants(proc.pid)}
            _stop(proc)
        deadline = time.monotonic() + 10
        while alive(pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(pids), f"left running: {sorted(alive(pids))}"


def _descendants(root: int) -> set[int]:
    from .fleetproc import _children_tree

    return _children_tree(root)


def test_a_restarted_coordinator_gets_engines_and_a_full_index_back(
    topology: Topology, tmp_path: Path
) -> None:
    before = {str(e["id"]): (e["pid"], e["node"]) for e in topology.engines()}

    async def poll(check: Callable[[], Awaitable[bool]], timeout_s: float = 60.0) -> None:
        with trio.fail_after(timeout_s):
            while True:
                with contextlib.suppress(httpx.HTTPError, ChaosError, KeyError, ValueError):
                    if await check():
                        return
                await trio.sleep(0.05)

    async def scenario() -> dict[str, Any]:
        async with httpx.AsyncClient() as http:
            target = await connect(topology.url, http)

            async def all_ready() -> bool:
                engines = await target.engines()
                return len(engines) == REPLICAS and all(e["routable"] for e in engines)

            async def index_full() -> bool:
                view = await compare(target, await target.engines())
                return len(view) == REPLICAS and not any(
                    v["missing"] or v["stale"] for v in view.values()
                )

            clock = run_clock()
            spec = load_spec(target, ChaosConfig(), "restart")
            async with background(topology.url, spec, clock) as load:
                await trio.sleep(2.0)
                topology.coordinator.send_signal(signal.SIGKILL)  # a crash, not a shutdown
                await trio.to_thread.run_sync(topology.coordinator.wait)
                killed = clock()
                topology.start_coordinator()
                started = clock()
                await poll(all_ready)
                routable = clock()
                await poll(index_full, 20)
                indexed = clock()
                await load.until(lambda rs: any(r.start_s > indexed + 2 for r in rs), 30)
            records = load.records
        after = [r for r in records if r.start_s > routable]
        return {
            "during": figures(records),
            "after": figures(after),
            "down_s": started - killed,
            "routable_s": routable - started,
            "index_full_s": indexed - started,
        }

    result = trio.run(scenario)
    now = {str(e["id"]): (e["pid"], e["node"]) for e in topology.engines()}
    assert now == before  # no engine restarted or moved
    after = result["after"]
    assert after["sent"] > 0 and after["succeeded"] == after["sent"], after  # served at once
    during = result["during"]
    report = {
        "scenario": "coordinator-restart",
        **{k: during[k] for k in ("sent", "succeeded", "failed", "lost", "broken")},
        "engines_restarted": 0,
        "routable_s": round(result["routable_s"], 2),
        "index_full_s": round(result["index_full_s"], 2),
    }
    print(json.dumps(report))
    (tmp_path / "coordinator-restart.json").write_text(json.dumps(report))


def test_agent_kill_meets_its_targets(topology: Topology) -> None:
    async def go() -> dict[str, object]:
        async with httpx.AsyncClient() as http:
            return await run("agent-kill", await connect(topology.url, http), ChaosConfig())

    result = trio.run(go)
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}))
    assert result["missed"] == [], json.dumps(result, indent=1)
