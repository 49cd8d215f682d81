"""The gauges and counters that mirror the coordinator's state, brought up to date before
``/metrics`` renders (:class:`StateGauges`): nodes and engines by state, breaker states,
leadership, autoscaler replicas, deployment costs, the KV index's size and its outcome and
drop counts (counted up by what is new since the last scrape)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .costs import deployment_costs
from .resilience import STATE_VALUES

if TYPE_CHECKING:
    from .kvindex import KVIndex
    from .leadership import Leadership
    from .metrics import CoordinatorMetrics
    from .placement import Placer
    from .proxy import Gateway
    from .registry import FleetRegistry
    from .scaling import Scaling


class Mirrored(Protocol):
    """What :class:`StateGauges` reads of a :class:`~.service.Coordinator`."""

    metrics: CoordinatorMetrics
    registry: FleetRegistry
    gateway: Gateway
    leadership: Leadership
    scaling: Scaling
    placer: Placer
    kvindex: KVIndex


class StateGauges:
    """Sets ``coord.metrics``' state gauges from ``coord`` on :meth:`refresh`."""

    def __init__(self, coord: Mirrored) -> None:
        self.coord = coord
        self._index_stats_seen: dict[str, int] = {}
        self._index_drops_seen: dict[str, int] = {}

    def refresh(self) -> None:
        """Update the gauges from the coordinator's state now."""
        coord = self.coord
        metrics, registry, kvindex = coord.metrics, coord.registry, coord.kvindex
        metrics.nodes.clear()
        for node in registry.nodes():
            state = "lost" if node.lost else "live"
            metrics.nodes.labels(state=state).inc()
        metrics.engines.clear()
        for engine in registry.engines():
            metrics.engines.labels(state=engine.state).inc()
        metrics.breaker_state.clear()
        for engine_id, state in coord.gateway.breakers.states().items():
            metrics.breaker_state.labels(engine=engine_id).set(STATE_VALUES[state])
        metrics.leader.set(1 if coord.leadership.leader else 0)
        metrics.autoscaler_replicas.clear()
        for name, decision in coord.scaling.decisions.items():
            metrics.autoscaler_replicas.labels(deployment=name).set(decision.replicas)
        metrics.deployment_cost.clear()
        placer = coord.placer
        for name, cost in deployment_costs(registry, placer, placer.prices).items():
            metrics.deployment_cost.labels(deployment=name).set(cost)
        metrics.kv_blocks.set(kvindex.block_count())
        metrics.kv_entries.set(kvindex.entries)
        metrics.kv_engines.set(kvindex.engine_count())
        for outcome, total in kvindex.stats.items():
            seen = self._index_stats_seen.get(outcome, 0)
            if total > seen:
                metrics.kv_index_outcomes.labels(outcome=outcome).inc(total - seen)
                self._index_stats_seen[outcome] = total
        for reason, total in kvindex.drops.items():
            seen = self._index_drops_seen.get(reason, 0)
            if total > seen:
                metrics.kv_engine_drops.labels(reason=reason).inc(total - seen)
                self._index_drops_seen[reason] = total


__all__ = ["Mirrored", "StateGauges"]
