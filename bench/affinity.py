"""CPU pinning for ``--isolate``: the proxies on a core of their own, the rest elsewhere.

A router in production runs in its own pod with CPUs of its own (Kubernetes' static CPU
manager), not on the cores its engines and clients run on. On a small machine that shares
everything, a proxy's added latency includes the times the kernel gave its core to an engine or
the load generator (bench/README.md, "Where the light-load tail comes from"); pinned apart, what
is left is the proxy's own cost.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable


def split_cpus(cpus: Iterable[int] | None = None) -> tuple[set[int], set[int]]:
    """The proxies' CPUs (the last one allowed) and everyone else's (the others).

    Raises:
        SystemExit: fewer than two CPUs.
    """
    allowed = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
    if len(allowed) < 2:
        raise SystemExit(f"--isolate needs two CPUs or more, this process may use {allowed}")
    return {allowed[-1]}, set(allowed[:-1])


def threads(pid: int) -> list[int]:
    """The thread ids of process ``pid`` (none once it has ended)."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return []


def children(pid: int) -> list[int]:
    """The processes ``pid``'s threads started."""
    out: list[int] = []
    for tid in threads(pid):
        with contextlib.suppress(FileNotFoundError):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
    return out


def pin(pid: int, cpus: set[int], *, tree: bool = False) -> int:
    """Pin every thread of ``pid`` (``tree``: and of its descendants) to ``cpus``; the
    threads pinned (one that ended meanwhile is skipped). Threads started later inherit it."""
    pinned = 0
    for tid in threads(pid):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(tid, cpus)
            pinned += 1
    if tree:
        for child in children(pid):
            pinned += pin(child, cpus, tree=True)
    return pinned


__all__ = ["children", "pin", "split_cpus", "threads"]
