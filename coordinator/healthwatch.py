"""The gateway's one watcher of engine health: every ``probe_after_s / 2`` it applies
:meth:`.EngineHealth.sweep` (the decisions), probes ``/health`` of the engines the sweep names
and counts the stalled ones (the I/O).

A whole engine process that hangs (SIGSTOP, a stuck host) is so found in seconds, not at the
requests' deadlines; one whose ``/health`` stays 200 while it makes nothing (vLLM's engine core
hung) at ``stall_s``. Probes use their own connections: a busy engine's pool may have none free.
"""

from __future__ import annotations

import httpx
import trio

from .enginehealth import EngineHealth
from .metrics import CoordinatorMetrics
from .registry import EngineView, FleetRegistry
from .resilience import ResilienceConfig


async def watch(
    health: EngineHealth,
    registry: FleetRegistry,
    metrics: CoordinatorMetrics,
    cfg: ResilienceConfig,
) -> None:
    """Sweep and probe until cancelled. An engine that fails its probe within
    ``probe_timeout_s`` with requests in flight is down (``health`` decides)."""
    async with (
        httpx.AsyncClient(timeout=cfg.probe_timeout_s) as client,
        trio.open_nursery() as nursery,
    ):
        while True:
            await trio.sleep(cfg.probe_after_s / 2)
            sweep = health.sweep(trio.current_time())
            for engine_id in sweep.stalled:
                metrics.stalls.labels(engine=engine_id).inc()
            for engine_id in sweep.probe:
                view = registry.engine(engine_id)
                if view is None:
                    health.probed(engine_id, True, trio.current_time())
                else:
                    nursery.start_soon(_probe, health, metrics, cfg, client, view)


async def _probe(
    health: EngineHealth,
    metrics: CoordinatorMetrics,
    cfg: ResilienceConfig,
    client: httpx.AsyncClient,
    engine: EngineView,
) -> None:
    ok: bool | None = None  # None: abandoned (cancelled), no verdict
    try:
        with trio.move_on_after(cfg.probe_timeout_s):
            try:
                ok = (await client.get(engine.url + "/health")).status_code == 200
            except httpx.HTTPError:
                ok = False
        ok = bool(ok)  # no answer in time: failed
    finally:
        if health.probed(engine.id, ok, trio.current_time()):
            metrics.stalls.labels(engine=engine.id).inc()


__all__ = ["watch"]
