"""An engine moves off a GPU that turns unhealthy, under load, without a failed request.

Real processes: ``fleet coordinator`` and two ``fleet agent --fake-gpus 2x80GiB`` nodes, a
deployment of two simulated engines with one GPU each (one per node, GPU 0). An XID is injected
into the GPU of node a's engine through a's HTTP API while a closed loop of clients sends
completions through the coordinator. The engine gets a copy on b's free GPU; a's copy keeps
serving until b's is ready, then stops. Every response must be a 200; the time from the XID to
the old copy's stop is printed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from fleet.agent.launcher import free_port

from .fleetproc import alive, children_tree, stop_process

CLIENTS = 4


class Fleet:
    """The coordinator and agents, their logs and URLs."""

    def __init__(self, logs: Path, demo_model: Path) -> None:
        self.logs = logs
        port, link_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{port}"
        link = f"tcp://127.0.0.1:{link_port}"
        self.model = demo_model.name
        fleet = [sys.executable, "-m", "fleet"]
        self.procs: list[subprocess.Popen[bytes]] = []
        self._start(
            "coordinator",
            [*fleet, "coordinator", "--port", str(port), "--agent-endpoint", link,
             "--model", str(demo_model), "--engine", "sim", "--replicas", "2",
             "--gpus-per-engine", "1", "--log-dir", str(logs / "coordinator")],
        )  # fmt: skip
        self.agents: dict[str, str] = {}
        for node in ("a", "b"):
            http_port = free_port()
            self.agents[node] = f"http://127.0.0.1:{http_port}"
            self._start(
                f"agent-{node}",
                [*fleet, "agent", "--coordinator", link, "--node-id", node, "--http-port",
                 str(http_port), "--log-dir", str(logs / node), "--fake-gpus", "2x80GiB"],
            )  # fmt: skip

    def _start(self, name: str, argv: list[str]) -> None:
        with open(self.logs / f"{name}.out", "ab") as out:
            self.procs.append(
                subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            )

    def tail(self) -> str:
        return "\n".join(
            f"--- {p.name}:\n{p.read_text(errors='replace')[-2000:]}"
            for p in sorted(self.logs.glob("*.out"))
        )

    def stop(self) -> None:
        pids: set[int] = set()
        for proc in self.procs:
            pids |= children_tree(proc.pid)
            stop_process(proc)
        deadline = time.monotonic() + 10
        while alive(pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(pids), f"left running: {sorted(alive(pids))}"


@pytest.fixture
def fleet(demo_model: Path, tmp_path: Path) -> Iterator[Fleet]:
    running = Fleet(tmp_path, demo_model)
    try:
        yield running
    finally:
        running.stop()


async def _engines(client: httpx.AsyncClient, url: str) -> list[dict[str, Any]]:
    return list((await client.get(url + "/api/v1/engines")).json()["engines"])


async def _poll(what: str, fleet: Fleet, check: Any, timeout_s: float = 40.0) -> Any:
    """Poll ``check()`` (async) every 50 ms until it returns something true; return that."""
    try:
        with trio.fail_after(timeout_s):
            while True:
                try:
                    result = await check()
                except (httpx.HTTPError, KeyError, ValueError):
                    result = None
                if result:
                    return result
                await trio.sleep(0.05)
    except trio.TooSlowError:
        raise AssertionError(f"{what} not within {timeout_s} s\n{fleet.tail()}") from None


def test_an_engine_on_a_gpu_that_turns_unhealthy_moves_with_no_failed_request(
    fleet: Fleet,
) -> None:
    trio.run(_scenario, fleet)


async def _scenario(fleet: Fleet) -> None:
    statuses: Counter[int | str] = Counter()
    stop_load = trio.Event()

    async def client_loop(client: httpx.AsyncClient, i: int) -> None:
        n = 0
        while not stop_load.is_set():
            n += 1
            body = {"model": fleet.model, "prompt": f"client {i} request {n}", "max_tokens": 8}
            try:
                answer = await client.post(fleet.url + "/v1/completions", json=body)
                statuses[answer.status_code] += 1
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1

    async with httpx.AsyncClient(timeout=30) as api:

        async def two_ready() -> list[dict[str, Any]] | None:
            engines = await _engines(api, fleet.url)
            ok = [e["state"] for e in engines] == ["ready", "ready"]
            return engines if ok and {e["node"] for e in engines} == {"a", "b"} else None

        engines = await _poll("two ready engines on nodes a and b", fleet, two_ready, 60)
        victim = next(e for e in engines if e["node"] == "a")
        assert victim["gpus"] == [0]
        nodes = (await api.get(fleet.url + "/api/v1/nodes")).json()["nodes"]
        assert all(g["fake"] for n in nodes for g in n["gpus"])

        async with httpx.AsyncClient(timeout=30) as load, trio.open_nursery() as nursery:
            for i in range(CLIENTS):
                nursery.start_soon(client_loop, load, i)
            await _poll("the first responses", fleet, lambda: _at_least(statuses, 20))

            answer = await api.post(f"{fleet.agents['a']}/api/v1/gpus/0/xid", json={"xid": 79})
            assert answer.status_code == 202, answer.text
            injected = time.monotonic()

            copies_seen: list[list[tuple[str, str]]] = []

            async def moved() -> bool:
                copies = [
                    (e["node"], e["state"])
                    for e in await _engines(api, fleet.url)
                    if e["id"] == victim["id"]
                ]
                if not copies_seen or copies_seen[-1] != copies:
                    copies_seen.append(copies)
                return copies == [("b", "ready")]

            await _poll(f"{victim['id']} moved to node b", fleet, moved)
            took = time.monotonic() - injected
            served_during = sum(statuses.values())
            await _poll("more responses after the move", fleet,
                        lambda: _at_least(statuses, served_during + 20))  # fmt: skip
            stop_load.set()

        print(
            f"\n{victim['id']} moved off a's unhealthy GPU 0 in {took:.2f} s "
            f"(XID to old copy gone); copies seen: {copies_seen}; responses: {dict(statuses)}"
        )
        # Make-before-break: a's copy was still listed, ready, while b's was not yet ready.
        assert ("a", "ready") in copies_seen[0]
        overlap = [c for c in copies_seen if ("b", "ready") in c and ("a", "ready") in c]
        starting = [c for c in copies_seen if len(c) == 2 and ("a", "ready") in c]
        assert starting or overlap, copies_seen
        assert all(any(s == "ready" for _, s in c) for c in copies_seen), copies_seen
        assert set(statuses) == {200}, dict(statuses)

        nodes = (await api.get(fleet.url + "/api/v1/nodes")).json()["nodes"]
        gpus_a = next(n for n in nodes if n["id"] == "a")["gpus"]
        assert [(g["index"], g["healthy"], g["xids"]) for g in gpus_a] == [
            (0, False, [79]),
            (1, True, []),
        ]
        engines = await _engines(api, fleet.url)
        assert sorted((e["node"], e["gpus"]) for e in engines) == [("b", [0]), ("b", [1])]


async def _at_least(statuses: Counter[int | str], n: int) -> bool:
    return sum(statuses.values()) >= n
