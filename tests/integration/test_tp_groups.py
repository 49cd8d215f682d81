"""A tensor-parallel group across two nodes, with real vLLM CPU engines.

``fleet coordinator`` with one deployment of the demo model (2 attention heads) at
``tensorParallelSize: 2``, and two ``fleet agent`` processes as nodes ``a`` and ``b``: each node
runs one rank (CPU groups spread one rank per node; gloo over loopback). The openai client gets
completions through the coordinator; then rank 1's process is SIGKILLed. Rank 0 outlives it
(answering 503), so the coordinator must tear the whole group down and place it again with a
fresh rendezvous; completions succeed again, and the time to recover is printed.

Waits are safety bounds in minutes (two CPU ranks load in ~30-60 s on an idle 2-core machine,
much longer on a busy one); the figures printed are what this test measures.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from fleet.agent.launcher import free_port

from .fleetproc import alive, children_tree, stop_process

pytestmark = pytest.mark.engine

GROUP = "tp-0"  # the group's engine id: rank 0's, the routable one
RANK1 = "tp-0.rank1"
START_BOUND_S = 600.0  # a safety bound, not an expectation


@dataclass
class Fleet:
    logs: Path
    url: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def engines(self) -> dict[str, dict[str, Any]]:
        engines = httpx.get(self.url + "/api/v1/engines", timeout=30).json()["engines"]
        return {str(e["id"]): e for e in engines if not e["state"] == "lost"}

    def wait(self, what: str, check: Callable[[], bool], timeout_s: float) -> float:
        """Poll ``check()`` until true (a safety bound of ``timeout_s``); the seconds it took."""
        started = time.monotonic()
        while True:
            try:
                if check():
                    return time.monotonic() - started
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            for name, proc in self.procs.items():
                assert proc.poll() is None, f"{name} exited with {proc.returncode}" + self.tails()
            if time.monotonic() - started > timeout_s:
                raise AssertionError(f"{what} not within {timeout_s} s" + self.tails())
            time.sleep(0.5)

    def tails(self, lines: int = 30) -> str:
        out = []
        for log in sorted(self.logs.rglob("*.out")) + sorted(self.logs.rglob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"\n--- {log.relative_to(self.logs)} ---\n" + "\n".join(text))
        return "".join(out)


@pytest.fixture
def fleet(demo_model: Path, tmp_path: Path) -> Iterator[Fleet]:
    folder = tmp_path / "deployments"
    folder.mkdir()
    doc = {
        "apiVersion": "fleet.dev/v1alpha1",
        "kind": "FleetModel",
        "metadata": {"name": "tp"},
        "spec": {
            "servedModelNames": ["demo"],
            "source": str(demo_model),
            "replicas": 1,
            "tensorParallelSize": 2,
            "engineArgs": ["--max-model-len", "512"],
        },
    }
    (folder / "tp.yaml").write_text(yaml.safe_dump(doc))
    port, link = free_port(), f"tcp://127.0.0.1:{free_port()}"
    logs = tmp_path / "logs"
    logs.mkdir()
    top = Fleet(logs, f"http://127.0.0.1:{port}")
    cmd = [sys.executable, "-m", "fleet"]
    argv = {
        "coordinator": [*cmd, "coordinator", "--port", str(port), "--agent-endpoint", link,
                        "--deployments", str(folder), "--engine", "vllm"],
        **{
            f"agent-{node}": [*cmd, "agent", "--coordinator", link, "--node-id", node,
                              "--http-port", "0", "--log-dir", str(logs / node)]
            for node in ("a", "b")
        },
    }  # fmt: skip
    pids: set[int] = set()
    try:
        for name, args in argv.items():
            with open(logs / f"{name}.out", "ab") as out:
                top.procs[name] = subprocess.Popen(
                    args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
        yield top
    finally:
        for proc in top.procs.values():
            pids |= children_tree(proc.pid) | {proc.pid}
        for proc in reversed(list(top.procs.values())):  # agents first: they stop the engines
            stop_process(proc, 60.0)
        deadline = time.monotonic() + 30
        while alive(pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(pids), f"left running: {sorted(alive(pids))}"


def _complete(client: openai.OpenAI) -> str:
    out = client.completions.create(
        model="demo", prompt="The capital of", max_tokens=8, temperature=0
    )
    return out.choices[0].text


def test_a_group_across_two_nodes_serves_and_recovers_from_a_dead_rank(fleet: Fleet) -> None:
    def routable() -> bool:
        engines = fleet.engines()
        return bool(engines[GROUP]["routable"]) and engines[RANK1]["state"] == "ready"

    took = fleet.wait("the TP=2 group routable", routable, START_BOUND_S)
    engines = fleet.engines()
    assert {engines[GROUP]["node"], engines[RANK1]["node"]} == {"a", "b"}  # one rank per node
    assert not engines[RANK1]["routable"]  # ranks above 0 have no API: never routed to
    print(f"\nTP=2 group (2 nodes) routable {took:.1f} s after start")

    client = openai.OpenAI(base_url=fleet.url + "/v1", api_key="unused", max_retries=0)
    first = _complete(client)
    assert first

    head_pid, rank1_pid = engines[GROUP]["pid"], engines[RANK1]["pid"]
    killed = time.monotonic()
    os.kill(rank1_pid, signal.SIGKILL)

    def recovered() -> bool:
        now = fleet.engines()
        return (
            bool(now[GROUP]["routable"])
            and now[GROUP]["pid"] != head_pid  # rank 0 was not trusted: restarted too
            and now[RANK1]["pid"] != rank1_pid
        )

    fleet.wait("the group routable again after rank 1's SIGKILL", recovered, START_BOUND_S)
    # Routable is enough to send; the first completion after it is part of the recovery.
    while True:
        try:
            again = _complete(client)
            break
        except openai.APIError:
            assert time.monotonic() - killed < START_BOUND_S, fleet.tails()
            time.sleep(0.5)
    recovery = time.monotonic() - killed
    assert again == first  # greedy, same weights, same group shape: the same answer
    print(f"TP=2 group recovered from rank 1's SIGKILL in {recovery:.1f} s (completions again)")
