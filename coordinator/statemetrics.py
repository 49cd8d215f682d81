"""Metrics read from the coordinator's state when ``/metrics`` is scraped.

:class:`FleetStateCollector` is a prometheus-client collector: nothing on the request path
touches a metric object for these. It reads the scheduler's :class:`~.router.tally.SchedulerTally`
(decisions, scheduling and per-plugin time, prefix blocks, session affinity), each deployment's
desired and ready engines, the autoscalers' bounds, the admission queues by priority and the
requests in flight on each engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .admission import PRIORITIES

if TYPE_CHECKING:
    from .config import CoordinatorConfig
    from .placement import Placer
    from .proxy import Gateway
    from .registry import FleetRegistry
    from .router.scheduler import Scheduler
    from .scaling import Scaling


class Observed(Protocol):
    """What the collector reads of a :class:`~.service.Coordinator`."""

    cfg: CoordinatorConfig
    placer: Placer
    registry: FleetRegistry
    scaling: Scaling
    scheduler: Scheduler

    gateway: Gateway


class FleetStateCollector(Collector):
    """Yields the coordinator's state-derived metrics (see the module docstring).

    Args:
        coord: the coordinator; read at each scrape, never written.
    """

    def __init__(self, coord: Observed) -> None:
        self.coord = coord

    def describe(self) -> Iterator[Metric]:
        """The families' names and types, without reading any state (registration)."""
        yield from self._build(fill=False)

    def collect(self) -> Iterator[Metric]:
        """Every family, filled from the coordinator's state now."""
        yield from self._build(fill=True)

    def _build(self, *, fill: bool) -> Iterator[Metric]:
        decisions = CounterMetricFamily(
            "fleet_scheduler_decisions",
            "Scheduling decisions, by outcome: picked (an engine was chosen), no_engine (every "
            "candidate was filtered out).",
            labels=["outcome"],
        )
        duration = HistogramMetricFamily(
            "fleet_scheduler_duration_seconds",
            "Time to pick an engine for a request (filters, scorers and picker).",
        )
        plugins = HistogramMetricFamily(
            "fleet_scheduler_plugin_duration_seconds",
            "Time spent in each scheduling plugin, by plugin name, kind (filter, scorer, "
            "picker) and type.",
            labels=["plugin", "kind", "type"],
        )
        prompt = CounterMetricFamily(
            "fleet_scheduler_prompt_blocks",
            "Full KV blocks of the prompts scheduled with their tokens known (prefix hit rate: "
            "fleet_scheduler_prefix_hit_blocks_total / this).",
        )
        hits = CounterMetricFamily(
            "fleet_scheduler_prefix_hit_blocks",
            "Of fleet_scheduler_prompt_blocks_total, the blocks the chosen engine held cached "
            "(the prompt's longest cached prefix there).",
        )
        affinity = CounterMetricFamily(
            "fleet_scheduler_session_affinity",
            "Requests with a session id, by outcome: hit (sent to the session's engine), miss "
            "(the session's engine could serve and another was chosen), none (no candidate was "
            "the session's engine: a new session, or its engine is gone).",
            labels=["outcome"],
        )
        desired = GaugeMetricFamily(
            "fleet_deployment_desired_engines",
            "Engines each deployment should run now (its replicas, or the autoscaler's count).",
            labels=["deployment"],
        )
        ready = GaugeMetricFamily(
            "fleet_deployment_ready_engines",
            "Engines of each deployment that take requests now (0 is reported too).",
            labels=["deployment"],
        )
        low = GaugeMetricFamily(
            "fleet_autoscaler_min_replicas",
            "The autoscaler's lower bound, by deployment (the leader's autoscaled ones).",
            labels=["deployment"],
        )
        high = GaugeMetricFamily(
            "fleet_autoscaler_max_replicas",
            "The autoscaler's upper bound, by deployment (the leader's autoscaled ones).",
            labels=["deployment"],
        )
        queued = GaugeMetricFamily(
            "fleet_queue_requests",
            "Requests waiting for a slot on this coordinator, by model and priority "
            "(critical, high, standard, batch).",
            labels=["model", "priority"],
        )
        inflight = GaugeMetricFamily(
            "fleet_requests_inflight",
            "Requests being proxied, by engine.",
            labels=["engine"],
        )
        bound = GaugeMetricFamily(
            "fleet_queue_max_length",
            "Waiters each model's queue may hold, fleet-wide (max_queue); past it requests "
            "are shed with 503.",
        )
        if fill:
            tally = self.coord.scheduler.tally
            for outcome, n in tally.decisions.items():
                decisions.add_metric([outcome], n)
            duration.add_metric([], tally.cumulative_buckets(), tally.duration_sum_s)
            for name, t in sorted(tally.plugins.items()):
                plugins.add_metric([name, t.kind, t.type], t.cumulative_buckets(), t.seconds)
            prompt.add_metric([], tally.prompt_blocks)
            hits.add_metric([], tally.matched_blocks)
            for outcome, n in tally.affinity.items():
                affinity.add_metric([outcome], n)
            self._deployments(desired, ready, low, high)
            self._queues(queued, bound)
            # every known engine, 0 included, and any that left with requests still in flight
            counts = self.coord.gateway.inflight.counts()
            for engine_id in sorted({e.id for e in self.coord.registry.engines()} | set(counts)):
                inflight.add_metric([engine_id], counts.get(engine_id, 0))
        yield from (decisions, duration, plugins, prompt, hits, affinity)
        yield from (desired, ready, low, high, queued, bound, inflight)

    def _deployments(
        self,
        desired: GaugeMetricFamily,
        ready: GaugeMetricFamily,
        low: GaugeMetricFamily,
        high: GaugeMetricFamily,
    ) -> None:
        coord = self.coord
        routable: dict[str, int] = {}
        for engine in coord.registry.engines():
            owner = coord.placer.owner(engine.id)
            if owner is not None and engine.routable:
                routable[owner.name] = routable.get(owner.name, 0) + 1
        for d in coord.placer.deployments:
            desired.add_metric([d.name], d.replicas)
            ready.add_metric([d.name], routable.get(d.name, 0))
        for name, (lowest, highest) in sorted(coord.scaling.bounds().items()):
            low.add_metric([name], lowest)
            high.add_metric([name], highest)

    def _queues(self, queued: GaugeMetricFamily, bound: GaugeMetricFamily) -> None:
        # Every deployed name and priority, 0 included, so a queue's graph has no holes.
        waiting = {
            (name, priority): 0
            for d in self.coord.placer.deployments
            for name in d.served_names
            for priority in PRIORITIES
        }
        waiting.update(self.coord.gateway.admission.queued_by_priority())
        for (model, priority), n in sorted(waiting.items()):
            queued.add_metric([model, priority], n)
        bound.add_metric([], self.coord.cfg.max_queue)


__all__ = ["FleetStateCollector", "Observed"]
