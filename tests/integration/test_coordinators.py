"""``fleet up --coordinators 2`` on simulated engines: two coordinator processes behind one
port, one leading placement; SIGKILL of the leader under load.

Requests sent after the kill are all served (the survivor takes every new connection), the
survivor leads within its lock retry, the killed coordinator is started again, and no engine is
placed twice or restarted."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from .fleetproc import FleetProcess, children_tree

pytestmark = pytest.mark.engine

MODEL = "demo"


def _lock_pid(lock: Path) -> int:
    """The leader's pid, as its lock file says (``coord-N pid P``)."""
    match = re.fullmatch(r"coord-\d+ pid (\d+)\n", lock.read_text())
    assert match, lock.read_text()
    return int(match.group(1))


def _coordinators(root: int) -> set[int]:
    out = set()
    for pid in children_tree(root):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"coordinator" in cmdline[:5]:
            out.add(pid)
    return out


def _engines(url: str) -> dict[str, tuple[int, int]]:
    engines = httpx.get(url + "/api/v1/engines", timeout=30).json()["engines"]
    return {e["id"]: (e["pid"], e["restarts"]) for e in engines if e["state"] == "ready"}


def test_the_leaders_sigkill_loses_no_request_sent_after_it(
    demo_model: Path, tmp_path: Path
) -> None:
    logs = tmp_path / "logs"
    args = ["--model", str(demo_model), "--engine", "sim", "--replicas", "2", "--coordinators", "2"]
    proc = FleetProcess(args, logs)
    try:
        proc.wait_for(rf"Fleet is serving `{MODEL}`", 120)
        proc.wait_ready(2, 60)
        url = proc.url
        coordinators = _coordinators(proc.proc.pid)
        assert len(coordinators) == 2
        leader = _lock_pid(logs / "leader.lock")
        assert leader in coordinators
        # Both serve the one port: new connections reach either process.
        answered: set[int] = set()
        deadline = time.monotonic() + 30
        while answered != coordinators and time.monotonic() < deadline:
            answered.add(httpx.get(url + "/healthz", timeout=10).json()["pid"])
        assert answered == coordinators
        engines = _engines(url)
        assert len(engines) == 2

        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        killed_at: list[float] = []
        results: list[tuple[float, bool, str]] = []  # (sent at, ok, error)
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    out = client.completions.create(model=MODEL, prompt="Hi", max_tokens=8)
                    results.append((sent, out.usage is not None, ""))
                except openai.APIError as exc:
                    results.append((sent, False, f"{type(exc).__name__}: {exc}"))

        workers = [threading.Thread(target=load) for _ in range(6)]
        for w in workers:
            w.start()
        try:
            time.sleep(2.0)
            killed_at.append(time.monotonic())
            os.kill(leader, signal.SIGKILL)
            time.sleep(3.0)
        finally:
            stop.set()
            for w in workers:
                w.join(timeout=60)
        # A request sent a moment after the kill cannot have reached the dead process.
        after = [r for r in results if r[0] > killed_at[0] + 0.05]
        before = [r for r in results if r[0] <= killed_at[0] + 0.05]
        failed_after = [r[2] for r in after if not r[1]]
        print(f"\nbefore the kill: {sum(r[1] for r in before)}/{len(before)} served; "
              f"sent after it: {len(after) - len(failed_after)}/{len(after)} served")  # fmt: skip
        assert len(after) >= 10 and failed_after == []

        # The survivor leads; the killed one is started again, as a follower.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = _coordinators(proc.proc.pid)
            if len(now) == 2 and leader not in now and _lock_pid(logs / "leader.lock") != leader:
                break
            time.sleep(0.2)
        assert _lock_pid(logs / "leader.lock") in coordinators - {leader}
        assert len(_coordinators(proc.proc.pid)) == 2
        # Nothing placed twice, nothing restarted.
        assert _engines(url) == engines
        assigned = [line for line in proc.lines if "assigning " in line]
        assert len(assigned) == 2, assigned
    finally:
        proc.stop(signal.SIGTERM)
