"""Coordinator faults under load: ``coordinator-kill``.

Several coordinators serve one port (``fleet up --coordinators 2``: they share its listening
socket, and the one holding a lock leads placement). The leader is SIGKILLed while the load
runs; it must run on this machine (its ``/healthz`` names its pid). The requests it held die
with it: a client sees a dropped connection (``lost``) or a cut stream (``broken``). Every
request sent once its process is gone must be served by the others.

The load's counts (``sent``, ``succeeded``, ``failed``, ``lost``, ``broken``) are of the
requests sent after the leader's process was gone; those sent before are ``before_kill``
(counts by outcome; ``held_by_killed`` = its lost and broken, the price of the kill). Figures:
``gone_s`` (kill → the process gone), ``takeover_s`` (kill → another coordinator answers as
leader), ``restarted_s`` (kill → a new coordinator process answers), ``coordinators`` (found
before the kill), and the check that no engine was restarted or placed again (the same ids
and pids before and after).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

import httpx
import trio

from .errors import ChaosError
from .load import background, run_clock
from .nodes import alive
from .outcomes import figures, since
from .scenarios import ChaosConfig, Figures, load_spec
from .target import Target

#: ``/healthz`` asked over fresh connections this many times to find every coordinator.
PROBES = 60
POLL_S = 0.05
WATCH_TIMEOUT_S = 60.0


async def find_coordinators(url: str, probes: int = PROBES) -> dict[int, dict[str, Any]]:
    """Every coordinator process answering ``url``: pid → its ``/healthz``. Each probe opens
    a new connection (the kernel hands each to one of the processes sharing the port)."""
    found: dict[int, dict[str, Any]] = {}
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=5) as fresh:
        for _ in range(probes):
            try:
                health = (await fresh.get("/healthz")).json()
            except (httpx.HTTPError, ValueError):
                continue
            found[int(health["pid"])] = health
    return found


async def coordinator_kill(target: Target, cfg: ChaosConfig) -> Figures:
    """SIGKILL the leading coordinator under load (see the module docstring)."""
    found = await find_coordinators(target.url)
    leaders = [pid for pid, h in found.items() if h.get("leader")]
    if len(found) < 2 or len(leaders) != 1:
        raise ChaosError(
            f"coordinator-kill needs two coordinators on one port, one leading (fleet up "
            f"--coordinators 2); found {len(found)}, {len(leaders)} leading"
        )
    (leader,) = leaders
    engines_before = _engine_pids(await target.engines())
    clock = run_clock()
    async with background(target.url, load_spec(target, cfg, "coordinator-kill"), clock) as load:
        await trio.sleep(cfg.warmup_s)
        fault_t = clock()
        os.kill(leader, signal.SIGKILL)
        gone_t = await _until(clock, lambda: not alive(leader))
        takeover_t, restarted_t = await _watch(target.url, set(found), leader, clock)
        await trio.sleep(cfg.tail_s)
    engines_after = _engine_pids(await target.engines())
    before = [r for r in load.records if r.start_s <= gone_t]
    after = [r for r in load.records if r.start_s > gone_t]
    at_kill = figures(before)
    return {
        **figures(after),
        "before_kill": {k: at_kill[k] for k in ("sent", "succeeded", "failed", "lost", "broken")},
        "held_by_killed": at_kill["lost"] + at_kill["broken"],
        "coordinators": len(found),
        "gone_s": since(gone_t, fault_t),
        "takeover_s": since(takeover_t, fault_t),
        "restarted_s": since(restarted_t, fault_t),
        "checks": {
            "another coordinator leads": takeover_t is not None,
            "no engine restarted or placed again": engines_after == engines_before,
        },
    }


def _engine_pids(engines: list[dict[str, Any]]) -> dict[str, int]:
    return {str(e["id"]): int(e["pid"]) for e in engines}


async def _until(clock: Callable[[], float], done: Callable[[], bool]) -> float:
    """When ``done()`` first held: polled, as it reads another process's state in /proc."""
    with trio.fail_after(WATCH_TIMEOUT_S):
        while not done():  # noqa: ASYNC110 (no event to wait on: an outside process)
            await trio.sleep(POLL_S / 5)
    return clock()


async def _watch(
    url: str, known: set[int], killed: int, clock: Callable[[], float]
) -> tuple[float | None, float | None]:
    """When another coordinator first answered as leader, and when a new process (the killed
    one started again) first answered; None if not within the watch timeout."""
    takeover: float | None = None
    restarted: float | None = None
    with trio.move_on_after(WATCH_TIMEOUT_S):
        while takeover is None or restarted is None:
            for pid, health in (await find_coordinators(url, probes=8)).items():
                if takeover is None and pid != killed and health.get("leader"):
                    takeover = clock()
                if restarted is None and pid not in known:
                    restarted = clock()
            await trio.sleep(POLL_S)
    return takeover, restarted


__all__ = ["coordinator_kill", "find_coordinators"]
