"""Child processes that die with the agent, waited on by trio.

``trio.lowlevel.open_process`` forks from a worker thread, and ``PR_SET_PDEATHSIG`` fires when
the *thread* that forked exits, not the process: trio's idle worker threads exit after about ten
seconds and would take the engine with them. So Fleet forks from the trio thread itself (a fork
and exec take milliseconds) and waits for exit on a pidfd, which is how trio waits on Linux too.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

import trio

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child, between fork and exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ChildProcess:
    """A child process leading its own process group.

    Args:
        popen: the started process.
    """

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid
        self._pidfd: int | None = os.pidfd_open(popen.pid)

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    async def wait(self) -> int:
        """Wait for the process to exit and return its status (negative: killed by signal).

        Only one task may wait at a time.
        """
        if self.popen.poll() is None and self._pidfd is not None:
            await trio.lowlevel.wait_readable(self._pidfd)
        return self.popen.wait()

    def killpg(self, sig: int) -> None:
        """Send ``sig`` to the whole process group (it may outlive its leader)."""
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def group_alive(self) -> list[int]:
        """Live (non-zombie) members of the process group, read from /proc."""
        out = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # fields: state, ppid, pgrp, ...
            if int(fields[2]) == self.pid and fields[0] not in ("Z", "X"):
                out.append(int(entry))
        return out

    async def wait_group_gone(self, timeout_s: float) -> list[int]:
        """Wait until no member of the group runs; return those still running at the timeout."""
        with trio.move_on_after(timeout_s):
            # Nothing signals the end of a process group: read /proc again.
            while self.group_alive():  # noqa: ASYNC110
                await trio.sleep(0.02)
        return self.group_alive()

    def close(self) -> None:
        """Release the pidfd (call after the process was reaped)."""
        if self._pidfd is not None:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    stdout: IO[bytes] | int = subprocess.DEVNULL,
    die_with_parent: bool = True,
) -> ChildProcess:
    """Start ``argv`` in a new session; with ``die_with_parent`` it gets SIGKILL if we die.

    Raises:
        OSError: the executable cannot be started.
    """
    popen = subprocess.Popen(  # noqa: ASYNC220 - forked on purpose from this thread, see above
        list(argv),
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent if die_with_parent else None,  # noqa: PLW1509
    )
    return ChildProcess(popen)


__all__ = ["ChildProcess", "spawn"]
