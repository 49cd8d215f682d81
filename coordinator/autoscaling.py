"""The coordinator's autoscaling step, and the demand it counts.

Thin glue around :mod:`.scaling` (decisions) and :mod:`.demandboard` (the other coordinators'
demand): the leader samples each autoscaled deployment's demand (its own requests in flight and
queued, plus what the other coordinators report) and places the counts and tiers that changed; a
follower takes the counts the leader placed from what the nodes run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .demandboard import DemandBoard, FolderTransport, RedisTransport, Report, share_demand
from .deployspec import FleetModel
from .scaling import demand, running, tier_slots

if TYPE_CHECKING:
    from .demandboard import Transport
    from .service import Coordinator

log = logging.getLogger(__name__)


def transport_for(coord: Coordinator) -> Transport | None:
    """Where this coordinator shares demand: Redis (``--redis-url``), else a folder beside the
    leader's lock file; None for the only coordinator, or Lease-elected ones without Redis
    (the leader then counts its own demand only: docs/DEPLOYMENTS.md, "Autoscaling")."""
    cfg = coord.cfg
    if cfg.redis_url:
        import redis

        client = redis.Redis.from_url(cfg.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
        return RedisTransport(client)
    if cfg.leader_lock:
        lock = Path(cfg.leader_lock)
        return FolderTransport(lock.with_name(f"{lock.name}.demand"))
    return None


class Autoscaling:
    """One coordinator's part in autoscaling (see the module docstring)."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        interval = max(0.2, coord.cfg.heartbeat_interval_s / 2)
        self.interval_s = interval
        self.board = DemandBoard(coord.cfg.coordinator_id, max_age_s=max(3.0, 6 * interval))
        self.transport = transport_for(coord)

    def report(self) -> Report:
        """This coordinator's demand now."""
        gateway = self.coord.gateway
        return Report(
            coordinator=self.coord.cfg.coordinator_id,
            at=time.time(),
            queued=gateway.admission.queued_counts(),
            inflight=gateway.inflight.counts(),
        )

    async def run(self) -> None:
        """Share demand with the other coordinators until cancelled (nothing to do alone)."""
        if self.transport is not None:
            await share_demand(self.transport, self.board, self.report, interval_s=self.interval_s)

    def tick(self, now: float) -> None:
        """Leading: sample every autoscaled deployment's demand and place the counts that
        changed. Following: take the counts the leader placed, from what the nodes run."""
        coord = self.coord
        models = [m for _, m in coord.book.models()]
        if not coord.leadership.leader:
            ids = {e for node in coord.registry.live_nodes() for e in node.engines}
            if coord.scaling.follow(models, lambda m: running(m, ids)):
                coord.apply_declared()
            return
        gateway, board, wall = coord.gateway, self.board, time.time()

        def inflight(engine_id: str) -> int:
            return gateway.inflight.get(engine_id) + board.inflight(engine_id, wall)

        def queued(name: str) -> int:
            return gateway.admission.queued(name) + board.queued(name, wall)

        def demand_of(model: FleetModel) -> float:
            return demand(model, coord.placer, inflight, queued)

        def mix(model: FleetModel, units: int, before: tuple[str, ...]) -> tuple[str, ...] | None:
            speeds = coord.cfg.tier_speeds
            return tier_slots(model, units, before, coord.placer, coord.registry, speeds)

        changed = coord.scaling.tick(models, demand_of, now, mix)
        for name, decision in changed:
            tiers = ",".join(coord.scaling.slots.get(name, ())) or "any tier"
            log.info("autoscaler: %s %s; engines on %s", name, decision, tiers)
            coord.metrics.autoscaler_decisions.labels(deployment=name, mode=decision.mode).inc()
        if changed:
            coord.apply_declared()


__all__ = ["Autoscaling", "transport_for"]
