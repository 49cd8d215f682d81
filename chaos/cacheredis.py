"""The response cache's Redis stopped under load: ``response-cache-redis-down``.

The fleet runs with ``--response-cache redis://HOST:PORT/DB``, its Redis on this machine (the
coordinator's ``fleet_response_cache_info`` names it; its ``redis-server`` process is found by
the port it listens on). A load of repeated deterministic questions (``temperature`` 0, a few
distinct ones, streamed or not) runs, and beside it a load of questions each asked once, which
keeps Redis in use (lookups that miss, writes). Once answers are cached, Redis is stopped
(SIGSTOP: every call to it times out, a worse case for a client than refused connections,
which tests/integration/test_response_cache.py covers with a Redis killed and started again),
kept stopped for ``OUTAGE_S``, then continued (SIGCONT, whatever happened). A second load of
new questions then runs, so answers are written to Redis and hit again.

Figures: the load's counts over both phases; ``detect_s`` (stop → the coordinator reports Redis
down), ``recover_s`` (continue → Redis in use again); the cache's hits by phase, Redis errors,
writes to Redis after recovery. Checks: Redis found down and counted, back in use, writes and
hits after recovery (every request served is the suite's own check: nothing failed or lost).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import trio

from .errors import ChaosError
from .load import background, run_clock
from .outcomes import figures, since
from .scenarios import ChaosConfig, Figures, load_spec
from .target import Metrics, Target, deltas, total

OUTAGE_S = 3.0
DISTINCT = 12  # different questions per phase: each repeated many times
POLL_S = 0.1
LOOPBACK = ("127.0.0.1", "localhost", "::1")
COUNTERS = ("fleet_response_cache_hits_total", "fleet_response_cache_misses_total",
            "fleet_response_cache_stores_total", "fleet_response_cache_errors_total",
            "fleet_response_cache_redis_down_total")  # fmt: skip


def cache_backend(metrics: Metrics) -> tuple[str, str]:
    """The fleet's response cache: (backend, Redis host:port/db); ("", "") when off."""
    for name, labels, _ in metrics:
        if name == "fleet_response_cache_info":
            return labels.get("backend", ""), labels.get("redis", "")
    return "", ""


def redis_pid(port: int, proc: Path = Path("/proc")) -> int:
    """The pid of the ``redis-server`` listening on ``port`` on this machine.

    Raises:
        ChaosError: none found.
    """
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in (proc / "net" / table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if b"redis-server" not in (entry / "cmdline").read_bytes():
                continue
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        return int(entry.name)
    raise ChaosError(f"no redis-server process listens on port {port} on this machine")


@contextlib.asynccontextmanager
async def stopped(pid: int) -> AsyncIterator[None]:
    """SIGSTOP Redis for the block; SIGCONT on the way out, whatever happened."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGCONT)


async def _until(target: Target, up: float, clock: Callable[[], float], timeout_s: float) -> (
    float | None
):  # fmt: skip
    """When ``fleet_response_cache_redis_up`` first read ``up``; None if not within
    ``timeout_s``."""
    with trio.move_on_after(timeout_s):
        while total(await target.metrics(), "fleet_response_cache_redis_up") != up:  # noqa: ASYNC110 (another process's state)
            await trio.sleep(POLL_S)
        return clock()
    return None


async def response_cache_redis_down(target: Target, cfg: ChaosConfig) -> Figures:
    """Stop the cache's Redis under load, continue it (see the module docstring)."""
    backend, address = cache_backend(await target.metrics())
    if backend != "redis":
        raise ChaosError("response-cache-redis-down needs a fleet started with "
                         "--response-cache redis://HOST:PORT/DB")  # fmt: skip
    host, _, rest = address.rpartition(":")
    if host.strip("[]") not in LOOPBACK:
        raise ChaosError(f"the cache's Redis ({address}) must run on this machine, on loopback")
    pid = redis_pid(int(rest.split("/", 1)[0]))
    clock = run_clock()
    workers = max(1, cfg.concurrency // 2)
    spec = load_spec(target, cfg, "cache-before", temperature=0.0, distinct=DISTINCT,
                     concurrency=workers)  # fmt: skip
    fresh = load_spec(target, cfg, "cache-fresh", temperature=0.0, concurrency=workers)
    start = await target.metrics()
    async with (
        background(target.url, spec, clock) as load,
        background(target.url, fresh, clock) as fresh_load,
    ):
        await trio.sleep(cfg.warmup_s)
        await load.until(lambda records: len(records) >= 2 * DISTINCT, cfg.recover_timeout_s)
        before = await target.metrics()
        fault_t = clock()
        async with stopped(pid):
            detect_t = await _until(target, 0.0, clock, cfg.detect_timeout_s)
            await trio.sleep(OUTAGE_S)
            during = await target.metrics()
        heal_t = clock()
        recover_t = await _until(target, 1.0, clock, cfg.recover_timeout_s)
        healed = await target.metrics()
    spec = load_spec(target, cfg, "cache-after", temperature=0.0, distinct=DISTINCT)
    async with background(target.url, spec, clock) as after_load:
        await trio.sleep(max(cfg.tail_s, 1.0))
        await after_load.until(lambda records: len(records) >= 2 * DISTINCT, cfg.recover_timeout_s)
    end = await target.metrics()
    records = load.records + fresh_load.records + after_load.records
    phase = {
        "before": deltas(start, before, COUNTERS),
        "during": deltas(before, during, COUNTERS),
        "after": deltas(healed, end, COUNTERS),
    }
    hits_after = total(end, "fleet_response_cache_hits_total") - total(
        healed, "fleet_response_cache_hits_total"
    )
    redis_writes_after = phase["after"].get("fleet_response_cache_stores_total{layer=redis}", 0)
    down_counted = total(during, "fleet_response_cache_redis_down_total") - total(
        before, "fleet_response_cache_redis_down_total"
    )
    during_records = [r for r in records if fault_t <= r.start_s < heal_t]
    return {
        **figures(records),
        "served_during_outage": sum(r.status == 200 for r in during_records),
        "sent_during_outage": len(during_records),
        "outage_s": OUTAGE_S,
        "detect_s": since(detect_t, fault_t),
        "recover_s": since(recover_t, heal_t),
        "cache": phase,
        "checks": {
            "redis found down and counted": detect_t is not None and down_counted >= 1,
            "redis back in use after it continued": recover_t is not None,
            "answers written to redis after recovery": redis_writes_after > 0,
            "hits after recovery": hits_after > 0,
        },
    }


__all__ = ["cache_backend", "redis_pid", "response_cache_redis_down"]
