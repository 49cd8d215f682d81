"""Run ``fleet up`` as a real process tree and watch it from a test."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

START_TIMEOUT_S = 420.0  # a CPU engine loads in ~40 s; CI machines are slower and busy


class FleetProcess:
    """``python -m fleet up ...`` with its output collected line by line.

    Args:
        args: arguments after ``fleet up``.
        log_dir: where fleet and the engines write logs.
        env: variables to set in its environment, over the test's own.
    """

    def __init__(
        self, args: Sequence[str], log_dir: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.log_dir = log_dir
        self.lines: list[str] = []
        self._cond = threading.Condition()
        argv = [sys.executable, "-m", "fleet", "up", "--port", "0", "--log-dir", str(log_dir)]
        self.proc = subprocess.Popen(
            [*argv, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
        )
        self._reader = threading.Thread(target=self._read, name="fleet-up-output", daemon=True)
        self._reader.start()
        self.url = self.wait_for(r"coordinator listening on (\S+)", 60).group(1)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout_s: float, *, after: int = 0) -> re.Match[str]:
        """Wait for an output line (from index ``after`` on) matching ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        with self._cond:
            index = after
            while True:
                while index < len(self.lines):
                    match = regex.search(self.lines[index])
                    if match:
                        return match
                    index += 1
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and index >= len(self.lines)):
                    raise AssertionError(
                        f"no line matching {pattern!r} within {timeout_s} s; output:\n"
                        + "\n".join(self.lines[-40:])
                        + self.engine_log_tail()
                    )
                self._cond.wait(timeout=min(left, 1.0))

    def wait_ready(self, count: int, timeout_s: float) -> None:
        """Wait until the coordinator lists ``count`` ready engines; on timeout the assertion
        carries fleet's output and every engine log's tail (a CI run is diagnosed from it)."""
        deadline = time.monotonic() + timeout_s
        while True:
            engines = httpx.get(self.url + "/api/v1/engines", timeout=30).json()["engines"]
            if sum(e["state"] == "ready" for e in engines) >= count:
                return
            if time.monotonic() > deadline or self.proc.poll() is not None:
                states = {e["id"]: (e["state"], e.get("restarts")) for e in engines}
                raise AssertionError(
                    f"{count} engines not ready within {timeout_s} s: {states}; output:\n"
                    + "\n".join(self.lines[-60:])
                    + self.engine_log_tail(40)
                )
            time.sleep(0.5)

    def engine_log_tail(self, lines: int = 15) -> str:
        out = []
        for log in sorted(self.log_dir.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"\n--- {log.name} ---\n" + "\n".join(text))
        return "".join(out)

    def descendants(self) -> set[int]:
        """Every live process below ``fleet up`` (zombies excluded)."""
        return {pid for pid in children_tree(self.proc.pid) if _alive(pid)}

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        """Signal ``fleet up`` and wait for it; kill the group if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise
        self._reader.join(timeout=5)
        return self.proc.returncode


def children_tree(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    out: set[int] = set()
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in out:
                out.add(child)
                frontier.append(child)
    return out


def _alive(pid: int) -> bool:
    """True if the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def alive(pids: set[int]) -> set[int]:
    """The subset of ``pids`` that still runs."""
    return {pid for pid in pids if _alive(pid)}


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """SIGTERM a process started in its own session; SIGKILL its group if it outlives
    ``timeout_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
