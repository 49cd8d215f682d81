"""Chaos across processes: a coordinator and three agents (``fleet coordinator`` + 3 × ``fleet
agent``, two simulated engines each; node c reaches the coordinator through a fault-injecting
TCP proxy), for the faults a one-process ``fleet up`` cannot have.

1. The coordinator (``--hot-restart``) is restarted under load, gracefully (SIGHUP: not one
   request fails), then crashed (SIGKILL: the requests sent after it are all served): no engine
   restarts, every engine is routable again, and the KV index equals the engines' own caches
   without any new traffic (the agents' snapshots), timed from the new coordinator's start.
2. Node c's agent link partitioned (the proxy cuts it) past the coordinator's patience: c lost,
   its engines placed on a and b; healed, c's surviving copies are stopped.
3. ``agent-kill`` (the chaos scenario): one node's agent SIGKILLed under load; its engines die
   with it, their streams and requests move, the node's engines are placed on the others.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
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
from fleet.chaos.tcpproxy import FaultProxy

from .fleetproc import alive, stop_process

REPLICAS = 6
# A request sent this soon after the coordinator's SIGKILL may still go out on a keep-alive
# connection to the dead process (the client has not seen its reset yet): lost with it.
STALE_S = 0.1
SIMS = ["--engine-arg=--sim-num-blocks=128", "--engine-arg=--sim-decode-batch-slope=1.0"]


class ProxyThread:
    """A :class:`FaultProxy` served by its own trio loop in a thread (the tests are sync)."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "the proxy did not start"
        self.port = proxy.port

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.proxy.run)
                self._ready.set()

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` (a mode change) in the proxy's loop, from any other thread."""
        trio.from_thread.run_sync(fn, trio_token=self._token)

    def stop(self) -> None:
        assert self._scope is not None
        self.call(self._scope.cancel)
        self._thread.join(timeout=10)


@dataclass
class Topology:
    """The processes, their logs, and how to start the coordinator again."""

    logs: Path
    url: str
    coordinator_argv: list[str]
    coordinator: subprocess.Popen[bytes]
    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    proxy: ProxyThread | None = None

    def worker(self) -> int | None:
        """The pid of the coordinator process the hot-restart parent runs now (the newest)."""
        children: list[tuple[int, int]] = []  # (start time, pid)
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if fields[1] == str(self.coordinator.pid) and fields[0] != "Z":
                    children.append((int(fields[19]), int(entry)))
        return max(children)[1] if children else None

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


@pytest.fixture(scope="module")
def topology(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    logs = tmp_path_factory.mktemp("chaos-nodes")
    port, link_port = free_port(), free_port()
    link = f"tcp://127.0.0.1:{link_port}"
    fleet = [sys.executable, "-m", "fleet"]
    argv = [*fleet, "coordinator", "--hot-restart", "--port", str(port), "--agent-endpoint", link]
    argv += ["--model", str(demo_model), "--engine", "sim", "--replicas", str(REPLICAS), *SIMS]
    argv += ["--log-dir", str(logs / "coordinator")]
    top = Topology(logs, f"http://127.0.0.1:{port}", argv, None)  # type: ignore[arg-type]
    proxy = ProxyThread(FaultProxy("127.0.0.1", link_port))
    top.proxy = proxy
    top.start_coordinator()
    try:
        for node in ("a", "b", "c"):  # c reaches the coordinator through the fault proxy
            via = f"tcp://127.0.0.1:{proxy.port}" if node == "c" else link
            with open(logs / f"agent-{node}.out", "ab") as out:
                top.agents[node] = subprocess.Popen(
                    [*fleet, "agent", "--coordinator", via, "--node-id", node, "--http-port",
                     "0", "--log-dir", str(logs / node)],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )  # fmt: skip
        top.wait(
            f"{REPLICAS} ready engines on three nodes",
            lambda: (
                [e["state"] for e in top.engines()] == ["ready"] * REPLICAS
                and {e["node"] for e in top.engines()} == {"a", "b", "c"}
            ),
            120,
        )
        yield top
    finally:
        proxy.stop()
        pids: set[int] = set()
        for proc in [top.coordinator, *top.agents.values()]:
            pids |= {p for p in _descendants(proc.pid)}
            stop_process(proc)
        deadline = time.monotonic() + 10
        while alive(pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(pids), f"left running: {sorted(alive(pids))}"


def _descendants(root: int) -> set[int]:
    from .fleetproc import children_tree

    return children_tree(root)


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

            async def back(old_pid: int) -> dict[str, float]:
                """Times from now (the fault) until another coordinator process answers, every
                engine is routable on it, and its KV index equals the engines' caches."""
                t0 = clock()

                async def replaced() -> bool:
                    pid = (await http.get(topology.url + "/healthz", timeout=5)).json()["pid"]
                    return bool(pid != old_pid and pid == topology.worker())

                await poll(replaced)
                started = clock()

                async def all_ready() -> bool:
                    engines = await target.engines()
                    return len(engines) == REPLICAS and all(e["routable"] for e in engines)

                async def index_full() -> bool:
                    view = await compare(target, await target.engines())
                    return len(view) == REPLICAS and not any(
                        v["missing"] or v["stale"] for v in view.values()
                    )

                await poll(all_ready)
                routable = clock()
                await poll(index_full, 20)
                return {
                    "answers_s": round(started - t0, 2),
                    "routable_s": round(routable - t0, 2),
                    "index_full_s": round(clock() - t0, 2),
                }

            clock = run_clock()
            spec = load_spec(target, ChaosConfig(), "restart")
            async with background(topology.url, spec, clock) as load:
                await trio.sleep(2.0)
                worker = topology.worker()
                assert worker is not None
                topology.coordinator.send_signal(signal.SIGHUP)  # a graceful restart
                hup = clock()
                graceful = await back(worker)
                await trio.sleep(2.0)
                worker = topology.worker()
                assert worker is not None
                os.kill(worker, signal.SIGKILL)  # a crash of the coordinator process
                crash = clock()
                crashed = await back(worker)
                await load.until(lambda rs: any(r.start_s > crash + 4 for r in rs), 30)
            records = load.records
        for r in records:  # what went wrong, for a failure's report
            if r.outcome.value != "succeeded":
                print(f"{r.outcome.value}: sent {r.start_s - hup:.3f} s after SIGHUP, "
                      f"{r.start_s - crash:.3f} s after SIGKILL, took {r.latency_s:.3f} s: "
                      f"{r.detail}")  # fmt: skip
        stale = crash + STALE_S
        return {
            "graceful": {**figures([r for r in records if r.end_s < crash]), **graceful},
            "crash": {**figures([r for r in records if r.start_s >= stale]), **crashed},
            "cut_by_crash": figures([r for r in records if r.start_s < crash <= r.end_s]),
            "sent_on_stale": figures([r for r in records if crash <= r.start_s < stale]),
        }

    result = trio.run(scenario)
    now = {str(e["id"]): (e["pid"], e["node"]) for e in topology.engines()}
    assert now == before  # no engine restarted or moved
    graceful, crash, cut = result["graceful"], result["crash"], result["cut_by_crash"]
    keys = ("sent", "succeeded", "failed", "lost", "broken")
    report = {
        "scenario": "coordinator-restart",
        "graceful": {k: graceful[k] for k in (*keys, "answers_s", "routable_s", "index_full_s")},
        "crash": {k: crash[k] for k in (*keys, "answers_s", "routable_s", "index_full_s")},
        "in_flight_at_crash": {k: cut[k] for k in keys},
        "sent_on_stale_connections": {k: result["sent_on_stale"][k] for k in keys},
        "engines_restarted": 0,
    }
    # Gracefully restarted: not one request refused, failed or cut.
    assert graceful["sent"] > 0 and graceful["succeeded"] == graceful["sent"], json.dumps(report)
    # Crashed: every request sent after the crash waits for the next process and is served.
    # Lost with the dead process: the requests it was serving, and those a client wrote on a
    # keep-alive connection to it in the instant before the kernel reset that connection.
    assert crash["sent"] > 0 and crash["succeeded"] == crash["sent"], json.dumps(report)
    print(json.dumps(report))
    (tmp_path / "coordinator-restart.json").write_text(json.dumps(report))


def test_a_partitioned_node_is_replaced_and_its_copies_stopped_when_it_returns(
    topology: Topology, tmp_path: Path
) -> None:
    """Node c's link to the coordinator is cut (the proxy resets every connection) for longer
    than the coordinator's patience: c is lost, its engines are placed on a and b. When the link
    heals, c comes back still running its copies: the coordinator stops them. Requests never
    notice (c's engines answer over HTTP, unaffected, until their copies are stopped)."""
    proxy = topology.proxy
    assert proxy is not None

    async def scenario() -> dict[str, Any]:
        async with httpx.AsyncClient() as http:
            target = await connect(topology.url, http)

            async def nodes() -> dict[str, dict[str, Any]]:
                return {n["id"]: n for n in (await target.get("/api/v1/nodes"))["nodes"]}

            async def wait(check: Callable[[], Awaitable[bool]], timeout_s: float) -> float:
                with trio.fail_after(timeout_s):
                    while not await check():  # noqa: ASYNC110 - polls over HTTP
                        await trio.sleep(0.05)
                return clock()

            async def c_lost() -> bool:
                return bool((await nodes())["c"]["lost"])

            async def replaced() -> bool:
                engines = await target.engines()
                return len(engines) >= REPLICAS and sorted(
                    e["node"] for e in engines if e["routable"]
                ) == sorted(["a"] * 3 + ["b"] * 3)

            async def settled() -> bool:
                engines = await target.engines()
                return (
                    not (await nodes())["c"]["lost"]
                    and len(engines) == REPLICAS
                    and all(e["routable"] and e["node"] in ("a", "b") for e in engines)
                )

            clock = run_clock()
            spec = load_spec(target, ChaosConfig(), "partition")
            async with background(topology.url, spec, clock) as load:
                await trio.sleep(1.0)
                cut = clock()
                await trio.to_thread.run_sync(proxy.call, proxy.proxy.partition)
                lost = await wait(c_lost, 15)
                moved = await wait(replaced, 30)
                await trio.to_thread.run_sync(proxy.call, proxy.proxy.heal)
                healed = clock()
                done = await wait(settled, 30)
                await trio.sleep(1.0)
            return {
                **figures(load.records),
                "detect_s": round(lost - cut, 2),
                "replaced_s": round(moved - cut, 2),
                "settled_after_heal_s": round(done - healed, 2),
                "connections_cut": proxy.proxy.cut,
            }

    result = trio.run(scenario)
    report = {"scenario": "link-partition", **{k: v for k, v in result.items() if k != "examples"}}
    print(json.dumps(report))
    (tmp_path / "link-partition.json").write_text(json.dumps(report))
    assert result["lost"] == result["broken"] == result["failed"] == 0, json.dumps(result)
    assert result["sent"] > 0 and result["connections_cut"] >= 1
    # c is back, empty: its copies were stopped, none runs there any more
    left = [e for e in topology.engines() if e["node"] == "c"]
    assert left == [], left


def test_agent_kill_meets_its_targets(topology: Topology) -> None:
    async def go() -> dict[str, object]:
        async with httpx.AsyncClient() as http:
            return await run("agent-kill", await connect(topology.url, http), ChaosConfig())

    result = trio.run(go)
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}))
    assert result["missed"] == [], json.dumps(result, indent=1)
