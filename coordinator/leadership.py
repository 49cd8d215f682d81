"""Which of several coordinators places engines: leadership, decided apart from its I/O.

Every coordinator serves inference; exactly one, the leader, sends placement decisions (assign,
unassign) to the agents. The others keep the same registry and KV index from the agents'
heartbeats and events, and take over when the leader goes.

:class:`Leadership` is the sans-I/O core: it is told whether this coordinator holds the lock
(:meth:`Leadership.observe`, with ``now``) and says whether it may place (:meth:`may_place`).
A coordinator that just became leader waits ``settle_s`` first: the old leader's last
assignments reach the registry with the agents' next heartbeats, and placing before would
start them a second time.

:class:`FileLock` is the one-machine backend (``fleet up --coordinators N``, or
``fleet coordinator --leader-lock PATH`` on a shared file system that honours ``flock``): an
exclusive, non-blocking ``flock`` held for the process's life. The kernel releases it when the
process dies, however it dies, so a SIGKILLed leader is replaced at the next try of another
coordinator (``retry_s``). The Kubernetes Lease backend is the cluster-mode issue's.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Change:
    """This coordinator became leader (``leader`` True) or stopped being it, at ``at``."""

    leader: bool
    at: float


class Leadership:
    """Whether this coordinator leads, and since when (see the module docstring).

    Args:
        settle_s: after becoming leader, place nothing for this long.
        leader: start as leader (a coordinator without a lock is the only one).
    """

    def __init__(self, *, settle_s: float, leader: bool = False) -> None:
        self.settle_s = settle_s
        self.leader = leader
        self.since = float("-inf") if leader else 0.0
        self.changes = 0

    def observe(self, holding: bool, now: float) -> Change | None:
        """Record whether the lock is held now; the change, if this is one."""
        if holding == self.leader:
            return None
        self.leader = holding
        self.since = now
        self.changes += 1
        return Change(holding, now)

    def may_place(self, now: float) -> bool:
        """Leader, and settled."""
        return self.leader and now >= self.since + self.settle_s


class FileLock:
    """An exclusive ``flock`` on ``path``, tried every ``retry_s`` until held, then kept.

    Args:
        path: the lock file (created if missing; its parent must exist).
        holder: written into the file once held, for operators (``cat PATH``).
    """

    def __init__(self, path: Path, holder: str) -> None:
        self.path = path
        self.holder = holder
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock if free; True while this process holds it."""
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{self.holder} pid {os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        """Let go (closing the file releases the lock)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


async def hold_file_lock(
    lock: FileLock,
    leadership: Leadership,
    *,
    retry_s: float,
    on_change: Callable[[Change], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Try ``lock`` every ``retry_s`` until held, then hold it until cancelled; tell
    ``leadership`` (and call ``on_change(change)`` if given) what happened."""
    task_status.started()
    try:
        while True:
            change = leadership.observe(lock.try_acquire(), trio.current_time())
            if change is not None:
                log.warning("%s is now the leader (lock %s): placing engines after %g s",
                            lock.holder, lock.path, leadership.settle_s)  # fmt: skip
                if on_change is not None:
                    on_change(change)
            if leadership.leader:
                await trio.sleep_forever()
            await trio.sleep(retry_s)
    finally:
        lock.release()
        leadership.observe(False, trio.current_time())


__all__ = ["Change", "FileLock", "Leadership", "hold_file_lock"]
