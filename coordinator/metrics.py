"""The coordinator's Prometheus metrics, in a registry each coordinator owns (no globals).

Metrics derived from state (the scheduler's tallies, deployments, queues by priority) are read
at scrape time by :mod:`.statemetrics`, registered in this registry by the coordinator. The
names, and the renames, are listed in docs/OBSERVABILITY.md."""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

import fleet

M = TypeVar("M", bound=MetricWrapperBase)

#: Time to first byte spans a cached prompt's milliseconds to a long prefill's minute.
FIRST_BYTE_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class PlainHistogram:
    """A histogram as plain numbers: per-bucket counts (not cumulative) and a sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """(``le``, cumulative count) pairs, as Prometheus wants them."""
        out, running = [], 0
        for bound, n in zip((*map(floatToGoString, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, float(running)))
        return out


class CoordinatorMetrics:
    """Every metric the coordinator exports on ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_errors = Counter(
            "fleet_requests_rejected_total",
            "Requests rejected before routing, by reason.",
            ["reason"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "fleet_upstream_errors_total",
            "Engine failures seen by the proxy, by engine.",
            ["engine"],
            registry=r,
        )
        self.rate_limited = Counter(
            "fleet_requests_rate_limited_total",
            "Requests refused with 429: their API key was over its rate limit.",
            ["key"],
            registry=r,
        )
        self.stream_resumes = Counter(
            "fleet_stream_resumes_total",
            "Streams an engine broke after they started, by outcome: resumed (continued on "
            "another engine), completed (the answer was whole; only its end was lost), "
            "unresumable, exhausted, refused, no_engine (the client got an error event).",
            ["outcome"],
            registry=r,
        )
        self.pd_requests = Counter(
            "fleet_pd_requests_total",
            "Requests under a prefill/decode config, by outcome: split (prefilled on a prefill "
            "engine, decoded on another), fallback (the prefill failed or was slow: decode "
            "only), decode_only (not split).",
            ["outcome"],
            registry=r,
        )
        self.pd_fallbacks = Counter(
            "fleet_pd_fallbacks_total",
            "Split requests that fell back to decode only, by why: refused, error, down, "
            "status, timeout, bad_answer.",
            ["reason"],
            registry=r,
        )
        self.ssrf_blocked = Counter(
            "fleet_ssrf_blocked_total",
            "Requests refused with 403 for naming a prefill engine or KV source they may not "
            "(x-prefiller-host-port, kv_transfer_params), by reason.",
            ["reason"],
            registry=r,
        )
        self.leader = Gauge(
            "fleet_coordinator_leader",
            "1 while this coordinator leads (places engines), else 0.",
            registry=r,
        )
        self.autoscaler_replicas = Gauge(
            "fleet_autoscaler_desired_replicas",
            "Engines the autoscaler wants, by deployment (minReplicas/maxReplicas ones).",
            ["deployment"],
            registry=r,
        )
        self.deployment_cost = Gauge(
            "fleet_deployment_cost_dollars_per_hour",
            "What each deployment's running engines cost, from --gpu-prices (0 unpriced).",
            ["deployment"],
            registry=r,
        )
        self.autoscaler_decisions = Counter(
            "fleet_autoscaler_decisions_total",
            "Replica count changes, by deployment and mode (stable, panic, from-zero, to-zero, "
            "idle).",
            ["deployment", "mode"],
            registry=r,
        )
        self.queued = Gauge(
            "fleet_queue_length", "Requests waiting for a slot, by model.", ["model"], registry=r
        )
        self.shed = Counter(
            "fleet_requests_shed_total",
            "Requests answered 503 by admission control (queue full, or no engine in time).",
            ["model"],
            registry=r,
        )
        self.stalls = Counter(
            "fleet_engine_stalls_total",
            "Engines found stalled or hung: requests in flight and no output for the stall "
            "time, or no answer to a health probe after probe_after_s of silence.",
            ["engine"],
            registry=r,
        )
        self.retries = Counter(
            "fleet_retries_total",
            "Requests retried on another engine, by why (connect, timeout, 5xx).",
            ["reason"],
            registry=r,
        )
        self.retry_budget_exhausted = Counter(
            "fleet_retry_budget_exhausted_total",
            "Retries not made because the retry budget was spent.",
            registry=r,
        )
        self.breaker_state = Gauge(
            "fleet_breaker_state",
            "Circuit breaker per engine: 0 closed, 1 half-open, 2 open.",
            ["engine"],
            registry=r,
        )
        self.kv_events = Counter(
            "fleet_kv_events_total", "KV events received, by engine.", ["engine"], registry=r
        )
        self.kv_batches = Counter(
            "fleet_kv_batches_total",
            "KV event batches received, by engine.",
            ["engine"],
            registry=r,
        )
        self.kv_block_events = Counter(
            "fleet_kv_block_events_total",
            "Blocks named by KV events received: stored, removed; cleared counts events.",
            ["type"],
            registry=r,
        )
        self.kv_blocks = Gauge("fleet_kv_index_blocks", "Distinct blocks indexed.", registry=r)
        self.kv_entries = Gauge(
            "fleet_kv_index_entries", "Indexed (block, engine) entries.", registry=r
        )
        self.kv_engines = Gauge("fleet_kv_index_engines", "Engines in the KV index.", registry=r)
        self.kv_index_outcomes = Counter(
            "fleet_kv_index_outcomes_total",
            "KV index bookkeeping: events applied, gaps, duplicates, restarts, resyncs, capped "
            "(not indexed: memory cap), orphans (parent unknown), malformed, snapshots "
            "(loaded from an agent after a (re)connect).",
            ["outcome"],
            registry=r,
        )
        self.kv_engine_drops = Counter(
            "fleet_kv_engine_drops_total",
            "Engines whose KV index entries were all dropped, by reason: restart, resync, "
            "gap_timeout, reorder_window, snapshot, model_changed (index); node_lost, "
            "engine_gone, engine_restarted, second_copy, relocated, crash_loop (fleet).",
            ["reason"],
            registry=r,
        )
        self.link_messages = Counter(
            "fleet_link_messages_total", "Agent messages received, by type.", ["type"], registry=r
        )
        self.link_rejected = Counter(
            "fleet_link_rejected_total",
            "Agent frames rejected (malformed, unknown version, ...) and, with CURVE, agent "
            "connections refused (curve_key, curve_handshake), by reason.",
            ["reason"],
            registry=r,
        )
        self.link_send_dropped = Counter(
            "fleet_link_send_dropped_total",
            "Messages to agents that could not be sent.",
            registry=r,
        )
        self.nodes = Gauge("fleet_nodes", "Known nodes, by state.", ["state"], registry=r)
        self.engines = Gauge("fleet_engines", "Known engines, by state.", ["state"], registry=r)
        self.nodes_lost = Counter("fleet_nodes_lost_total", "Nodes marked lost.", registry=r)
        self.limits_fallback = Counter(
            "fleet_shared_limits_fallback_total",
            "Rate-limit and queue-bound decisions made on this coordinator's share because Redis "
            "(--redis-url) could not be reached, by limit (rate, queue).",
            ["limit"],
            registry=r,
        )
        self.limits_redis_up = Gauge(
            "fleet_shared_limits_redis_up",
            "1 while the shared limits' Redis answers, 0 while this coordinator enforces its "
            "local share instead (absent without --redis-url).",
            registry=r,
        )
        self.tokenizer_ready = Gauge(
            "fleet_tokenizer_ready",
            "1 once the tokenizer files of a deployment's remote source are on this coordinator "
            "(prefix routing on for its models), 0 while they are being fetched, by source.",
            ["source"],
            registry=r,
        )
        self.tokenizer_fetch_failures = Counter(
            "fleet_tokenizer_fetch_failures_total",
            "Failed fetches of a remote source's tokenizer files (retried with backoff), by "
            "kind (not_found, unavailable, checksum_mismatch, not_a_model, no_space, "
            "store_error, internal).",
            ["kind"],
            registry=r,
        )

        self.build = Info("fleet_coordinator_build", "The coordinator's version.", registry=r)
        self.build.info({"version": fleet.__version__})
        # What every request adds, kept as plain numbers and read when scraped (no metric
        # object, lock or label lookup on the request path): see :meth:`answered`.
        self.answers: dict[tuple[str, str, str], int] = {}  # (endpoint, model, status) -> n
        self.first_bytes: dict[str, PlainHistogram] = {}  # model -> ttfb (FIRST_BYTE_BUCKETS_S)
        r.register(_RequestCollector(self))
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], MetricWrapperBase] = {}

    def answered(self, endpoint: str, model: str, status: int) -> None:
        """Count a request answered (``fleet_requests_total``)."""
        key = (endpoint, model, str(status))
        self.answers[key] = self.answers.get(key, 0) + 1

    def first_byte(self, model: str, seconds: float) -> None:
        """Add an engine's time to first byte (``fleet_upstream_first_byte_seconds``)."""
        found = self.first_bytes.get(model)
        if found is None:
            found = self.first_bytes[model] = PlainHistogram(FIRST_BYTE_BUCKETS_S)
        found.observe(seconds)

    def child(self, metric: M, *values: str) -> M:
        """``metric.labels(*values)``, resolved once and kept: for the metrics every request
        touches (``requests``, ``inflight``, ``ttfb``), whose children are never removed."""
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found  # type: ignore[return-value]

    def render(self) -> bytes:
        """Return the text exposition of every metric."""
        return generate_latest(self.registry)


class _RequestCollector(Collector):
    """``fleet_requests_total`` and ``fleet_upstream_first_byte_seconds`` from the plain
    numbers of :class:`CoordinatorMetrics`."""

    def __init__(self, metrics: CoordinatorMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        yield from self._families(self.metrics)

    @staticmethod
    def _families(metrics: CoordinatorMetrics | None = None) -> Iterator[Metric]:
        answers = CounterMetricFamily(
            "fleet_requests",
            "Requests answered, by endpoint, model and HTTP status.",
            labels=["endpoint", "model", "status"],
        )
        ttfb = HistogramMetricFamily(
            "fleet_upstream_first_byte_seconds",
            "Time from routing to the engine's first response byte (time to first token).",
            labels=["model"],
        )
        if metrics is not None:
            for key, n in sorted(metrics.answers.items()):
                answers.add_metric(list(key), n)
            for model, h in sorted(metrics.first_bytes.items()):
                ttfb.add_metric([model], h.cumulative(), h.sum)
        yield answers
        yield ttfb


__all__ = ["FIRST_BYTE_BUCKETS_S", "CoordinatorMetrics", "PlainHistogram"]
