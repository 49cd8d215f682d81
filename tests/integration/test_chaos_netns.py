"""Chaos across a real network link: node d runs in its own network namespace, joined to the
host by a veth pair, so its agent link *and* its engines' HTTP cross a link the test cuts
(``ip link set ... down``: packets vanish, nothing is reset, the hardest partition to notice).

``fleet coordinator`` (4 simulated engines) with agent a on the host and agent d in the
namespace, two engines each. Under load, with long streams on every engine, d's link goes down
for longer than the coordinator's patience: requests waiting on d's silent engines are found
by the health probe and moved (answers retried, streams resumed), d is lost and its engines
are placed on a; the link comes back and d's stale copies are stopped. Targets: nothing lost,
broken or failed.

Needs root and iproute2 (``ip netns``); skipped, saying so, without them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from fleet.agent.launcher import free_port
from fleet.chaos import ChaosConfig, connect
from fleet.chaos.engine_faults import LongStreams
from fleet.chaos.load import background, run_clock
from fleet.chaos.outcomes import figures
from fleet.chaos.scenarios import load_spec
from fleet.chaos.target import total

from .fleetproc import alive, children_tree

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="a network namespace needs root and iproute2 (ip netns)",
)

REPLICAS = 4
SIMS = ["--engine-arg=--sim-num-blocks=128", "--engine-arg=--sim-decode-batch-slope=1.0"]


@dataclass
class Netns:
    """A network namespace joined to the host by a veth pair."""

    name: str
    host_if: str
    host_ip: str
    ns_ip: str

    def cut(self) -> None:
        _ip("link", "set", self.host_if, "down")

    def heal(self) -> None:
        _ip("link", "set", self.host_if, "up")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@contextlib.contextmanager
def netns() -> Iterator[Netns]:
    tag = f"{os.getpid() % 100000}"
    subnet = f"10.213.{os.getpid() % 250}"
    ns = Netns(f"fleet-d-{tag}", f"fvh{tag}", f"{subnet}.1", f"{subnet}.2")
    peer = f"fvn{tag}"
    _ip("netns", "add", ns.name)
    try:
        _ip("link", "add", ns.host_if, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", ns.name)
        _ip("addr", "add", f"{ns.host_ip}/24", "dev", ns.host_if)
        _ip("link", "set", ns.host_if, "up")
        _ip("-n", ns.name, "addr", "add", f"{ns.ns_ip}/24", "dev", peer)
        _ip("-n", ns.name, "link", "set", peer, "up")
        _ip("-n", ns.name, "link", "set", "lo", "up")
        yield ns
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", ns.host_if)  # its peer goes with it
        _ip("netns", "del", ns.name)


@dataclass
class Fleet:
    url: str
    ns: Netns
    logs: Path


def _engines(url: str) -> list[dict[str, Any]]:
    engines: list[dict[str, Any]] = httpx.get(url + "/api/v1/engines", timeout=10).json()["engines"]
    return engines


@pytest.fixture(scope="module")
def fleet(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    logs = tmp_path_factory.mktemp("chaos-netns")
    port, link_port = free_port(), free_port()
    py = [sys.executable, "-m", "fleet"]
    procs: list[subprocess.Popen[bytes]] = []
    with netns() as ns:

        def start(name: str, argv: list[str]) -> None:
            with open(logs / f"{name}.out", "ab") as out:
                procs.append(
                    subprocess.Popen(
                        argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )

        try:
            start("coordinator", [
                *py, "coordinator", "--port", str(port),
                "--agent-endpoint", f"tcp://0.0.0.0:{link_port}",
                "--model", str(demo_model), "--engine", "sim", "--replicas", str(REPLICAS), *SIMS,
                "--log-dir", str(logs / "coordinator"),
            ])  # fmt: skip
            start("agent-a", [
                *py, "agent", "--coordinator", f"tcp://127.0.0.1:{link_port}", "--node-id", "a",
                "--http-port", "0", "--log-dir", str(logs / "a"),
            ])  # fmt: skip
            start("agent-d", [
                "ip", "netns", "exec", ns.name, *py, "agent",
                "--coordinator", f"tcp://{ns.host_ip}:{link_port}", "--node-id", "d",
                "--http-port", "0", "--engine-host", ns.ns_ip, "--log-dir", str(logs / "d"),
            ])  # fmt: skip
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    engines = _engines(url)
                    if [e["state"] for e in engines] == ["ready"] * REPLICAS and {
                        e["node"] for e in engines
                    } == {"a", "d"}:
                        break
                if time.monotonic() > deadline:
                    tail = (logs / "coordinator.out").read_text(errors="replace")[-3000:]
                    raise AssertionError(f"no 4 ready engines on a and d:\n{tail}")
                time.sleep(0.2)
            yield Fleet(url, ns, logs)
        finally:
            pids: set[int] = set()
            for proc in procs:
                pids |= children_tree(proc.pid)
                if proc.poll() is None:
                    proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    proc.wait()
            deadline = time.monotonic() + 10
            while alive(pids) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not alive(pids), f"left running: {sorted(alive(pids))}"


def test_a_node_cut_off_the_network_loses_no_request(fleet: Fleet, tmp_path: Path) -> None:
    async def scenario() -> dict[str, Any]:
        async with httpx.AsyncClient() as http:
            target = await connect(fleet.url, http)

            async def nodes() -> dict[str, dict[str, Any]]:
                return {n["id"]: n for n in (await target.get("/api/v1/nodes"))["nodes"]}

            async def wait(check: Callable[[], Awaitable[bool]], timeout_s: float) -> float:
                with trio.fail_after(timeout_s):
                    while not await check():  # noqa: ASYNC110 - polls over HTTP
                        await trio.sleep(0.05)
                return clock()

            async def d_lost() -> bool:
                return bool((await nodes())["d"]["lost"])

            async def replaced() -> bool:
                engines = await target.engines()
                routable = [e for e in engines if e["routable"]]
                return len(routable) == REPLICAS and all(e["node"] == "a" for e in routable)

            async def settled() -> bool:
                engines = await target.engines()
                return (
                    not (await nodes())["d"]["lost"]
                    and len(engines) == REPLICAS
                    and all(e["routable"] and e["node"] == "a" for e in engines)
                )

            clock = run_clock()
            spec = load_spec(target, ChaosConfig(), "netns")
            async with background(fleet.url, spec, clock) as load:
                await trio.sleep(1.0)
                streams = LongStreams(load, 2 * REPLICAS)
                async with trio.open_nursery() as nursery:
                    await nursery.start(streams.run)
                    d_engines = {e["id"] for e in await target.engines() if e["node"] == "d"}
                    on_d = sum(n for e, n in streams.on_engine.items() if e in d_engines)
                    cut = clock()
                    await trio.to_thread.run_sync(fleet.ns.cut)
                    lost = await wait(d_lost, 15)
                    moved = await wait(replaced, 30)
                    await trio.to_thread.run_sync(fleet.ns.heal)
                    healed = clock()
                    done = await wait(settled, 30)
                await trio.sleep(1.0)
            metrics = await target.metrics()
        return {
            **figures([*load.records, *streams.records]),
            "long_streams": len(streams.records),
            "long_streams_on_d": on_d,
            "long_stream_outcomes": figures(streams.records),
            "detect_s": round(lost - cut, 2),
            "replaced_s": round(moved - cut, 2),
            "settled_after_heal_s": round(done - healed, 2),
            "streams_resumed": total(metrics, "fleet_stream_resumes_total", outcome="resumed"),
        }

    result = trio.run(scenario)
    report = {
        "scenario": "netns-partition",
        **{k: v for k, v in result.items() if k not in ("examples", "long_stream_outcomes")},
    }
    print(json.dumps(report))
    (tmp_path / "netns-partition.json").write_text(json.dumps(report))
    assert result["lost"] == result["broken"] == result["failed"] == 0, json.dumps(result)
    assert result["long_streams_on_d"] >= 1  # the cut hit streams in progress
    assert result["streams_resumed"] >= 1
    left = [e for e in _engines(fleet.url) if e["node"] == "d"]
    assert left == [], left  # d is back, its stale copies stopped
