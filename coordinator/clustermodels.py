"""A coordinator serving the FleetModel custom resources of one namespace.

Thin trio glue between :mod:`.kubemodels` (the API calls) and the coordinator: every change of
the declared resources replaces the deployment book's FleetModel part and is placed at once;
while this coordinator leads, the resources' status, finalizers and Events follow what
placement makes of them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from .deploybook import status
from .fleetmodelcr import ResourceCache
from .kubelease import api_client
from .kubemodels import FleetModelApi, StatusWriter, watch_resources

if TYPE_CHECKING:
    from .service import Coordinator

log = logging.getLogger(__name__)


async def serve_fleetmodels(
    coord: Coordinator,
    api: FleetModelApi,
    *,
    watch_s: int,
    every_s: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep ``coord`` serving the FleetModels ``api`` reads; started once the first list is in
    (so a new leader never stops engines of resources it has not read yet)."""
    cache = ResourceCache()
    writer = StatusWriter(api)
    problems: dict[str, str] = {}

    def changed() -> None:
        nonlocal problems
        models, invalid = cache.models()
        before, problems = problems, {**invalid, **coord.book.set_cluster(models)}
        for name, problem in sorted(problems.items()):
            if before.get(name) != problem:
                log.error("FleetModel %s not served: %s", name, problem)
        coord.apply_declared()

    async with trio.open_nursery() as nursery:
        await nursery.start(
            functools.partial(watch_resources, api, cache, changed, watch_timeout_s=watch_s)
        )
        log.info("serving the FleetModels of namespace %s", api.namespace)
        task_status.started()
        leading = False
        while True:
            if coord.leadership.leader:
                if not leading:
                    writer.forget()  # a new leader writes every status once
                now = trio.current_time()
                rows = status(coord.placer, coord.registry, coord.book, coord.deployment_notes,
                              now, coord.groups)  # fmt: skip
                running = [e for node in coord.registry.live_nodes() for e in node.engines]
                await writer.write(cache, {r["name"]: r for r in rows}, problems, running)
            leading = coord.leadership.leader
            await trio.sleep(every_s)


def fleetmodels_task(coord: Coordinator) -> Callable[..., Awaitable[None]] | None:
    """The task serving ``--fleetmodels NAMESPACE`` (start it with ``nursery.start``); None
    without it. The Kubernetes client is built here, at once."""
    cfg = coord.cfg
    if cfg.fleetmodels_namespace is None:
        return None
    api = FleetModelApi(api_client(cfg.kube_api), cfg.fleetmodels_namespace, cfg.coordinator_id)
    every = max(0.2, cfg.heartbeat_interval_s / 2)
    return functools.partial(
        serve_fleetmodels, coord, api, watch_s=cfg.fleetmodels_watch_s, every_s=every
    )


__all__ = ["fleetmodels_task", "serve_fleetmodels"]
