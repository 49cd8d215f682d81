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
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet.agent.launcher import free_port
from fleet.chaos import ChaosConfig, connect, run

from ..k8sapi import running_emulator
from .fleetproc import FleetProcess, stop_process

pytestmark = pytest.mark.engine

MODEL = "demo"
LEASE_S = 3


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


# -- in a cluster: separate processes, leadership through a Kubernetes Lease --------------------


def _get(url: str) -> Any:
    try:
        return httpx.get(url, timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return None


def _start_pair(
    tmp_path: Path, flags: list[str], procs: list[subprocess.Popen[bytes]]
) -> dict[str, str]:
    """Start coordinators ``a`` and ``b`` (each with ``flags``) and one agent reporting to both,
    each process in ``procs`` as soon as it runs (the caller stops them); the HTTP URLs."""
    fleet = [sys.executable, "-m", "fleet"]
    ports = {n: (free_port(), free_port()) for n in ("a", "b")}
    for name, (http, link) in ports.items():
        argv = [*fleet, "coordinator", "--port", str(http), "--agent-endpoint",
                f"tcp://127.0.0.1:{link}", *flags, "--coordinator-id", f"coord-{name}",
                "--log-dir", str(tmp_path / name)]  # fmt: skip
        with open(tmp_path / f"{name}.out", "ab") as out:
            procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))  # fmt: skip
    links = ",".join(f"tcp://127.0.0.1:{link}" for _, link in ports.values())
    with open(tmp_path / "agent.out", "ab") as out:
        procs.append(subprocess.Popen(
            [*fleet, "agent", "--coordinator", links, "--node-id", "n1", "--http-port", "0",
             "--log-dir", str(tmp_path / "agent")],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        ))  # fmt: skip
    return {n: f"http://127.0.0.1:{http}" for n, (http, _) in ports.items()}


def _wait(what: str, check: Callable[[], bool], timeout_s: float = 60.0) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s} s: {what}"
        time.sleep(0.1)
    return time.monotonic() - start


def test_a_sigkilled_lease_holder_is_replaced_within_the_lease_duration(
    demo_model: Path, tmp_path: Path
) -> None:
    """Two ``fleet coordinator --leader-lease`` processes on the test API server and one agent
    reporting to both: SIGKILL of the leader (no hand-back) and the other leads once the Lease
    lapsed; the engines are neither restarted nor placed again."""
    procs: list[subprocess.Popen[bytes]] = []
    with running_emulator() as kube:
        try:
            flags = ["--model", str(demo_model), "--engine", "sim", "--replicas", "2",
                     "--leader-lease", "fleet-system/fleet-leader", "--kube-api", kube,
                     "--lease-duration", str(LEASE_S)]  # fmt: skip
            urls = _start_pair(tmp_path, flags, procs)

            def engines(name: str) -> dict[str, tuple[int, int]]:
                found = _get(urls[name] + "/api/v1/engines") or {"engines": []}
                return {e["id"]: (e["pid"], e["restarts"]) for e in found["engines"]
                        if e["state"] == "ready"}  # fmt: skip

            _wait("2 ready engines seen by both", lambda: all(len(engines(n)) == 2 for n in urls))
            leaders = [n for n in urls if (_get(urls[n] + "/healthz") or {}).get("leader")]
            assert len(leaders) == 1
            (leader,) = leaders
            (other,) = set(urls) - {leader}
            before = engines(other)
            procs[list(urls).index(leader)].send_signal(signal.SIGKILL)
            took = _wait(
                "the other coordinator leads",
                lambda: bool((_get(urls[other] + "/healthz") or {}).get("leader")),
            )
            print(f"\nthe Lease changed hands {took:.2f} s after the leader's SIGKILL "
                  f"(lease duration {LEASE_S} s)")  # fmt: skip
            reply = httpx.post(urls[other] + "/v1/completions", timeout=30,
                               json={"model": MODEL, "prompt": "Hi", "max_tokens": 4})  # fmt: skip
            assert reply.status_code == 200, reply.text
            time.sleep(2.0)  # two of the new leader's placement rounds: nothing to place
            assert engines(other) == before
            started = (tmp_path / "agent.out").read_text().count(": started pid")
            assert started == 2, started  # each engine started once
        finally:
            for proc in procs:
                stop_process(proc)


def test_a_request_reaching_a_follower_scales_a_deployment_from_zero(
    demo_model: Path, tmp_path: Path
) -> None:
    """Two ``fleet coordinator --leader-lock`` processes share a deployments folder with a
    ``minReplicas: 0`` deployment. Its first request goes to the follower, which cannot
    place: the follower's queued request reaches the leader through the demand both share
    beside the lock, the leader scales the deployment from zero, and the request is answered."""
    folder = tmp_path / "deployments"
    folder.mkdir()
    doc = {"apiVersion": "fleet.dev/v1alpha1", "kind": "FleetModel", "metadata": {"name": "zero"},
           "spec": {"source": str(demo_model), "minReplicas": 0, "maxReplicas": 2}}  # fmt: skip
    (folder / "zero.yaml").write_text(json.dumps(doc))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        flags = ["--deployments", str(folder), "--engine", "sim",
                 "--leader-lock", str(tmp_path / "leader.lock")]  # fmt: skip
        urls = _start_pair(tmp_path, flags, procs)

        def leads(name: str) -> bool | None:
            health = _get(urls[name] + "/healthz")
            return None if health is None else bool(health.get("leader"))

        _wait("one coordinator leads", lambda: sorted(map(str, map(leads, urls))) == ["False",
              "True"])  # fmt: skip
        (follower,) = [n for n in urls if not leads(n)]
        started = time.monotonic()
        reply = httpx.post(urls[follower] + "/v1/completions", timeout=60,
                           json={"model": "zero", "prompt": "Hi", "max_tokens": 4})  # fmt: skip
        took = time.monotonic() - started
        assert reply.status_code == 200, reply.text
        print(f"\nscaled from zero through the follower: answered in {took:.2f} s")
        logs = "".join((tmp_path / f"{n}.out").read_text() for n in urls)
        assert "from-zero" in logs, logs[-3000:]
    finally:
        for proc in procs:
            stop_process(proc)
