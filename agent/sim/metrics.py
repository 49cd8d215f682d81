"""``/metrics`` with vLLM 0.32's names, labels, help texts and histogram buckets.

Ground truth: vllm/v1/metrics/loggers.py and a scrape of a real 0.32 engine. vLLM serves its
metrics through prometheus' multiprocess collector, which sorts label names, so every family
here declares them sorted (``engine`` before ``model_name``) and the exposition reads the same.
Labels: ``engine="0"``, ``model_name`` = the first served name.

Exposed families: the scheduler gauges (``vllm:num_requests_running``, ``_waiting``,
``vllm:kv_cache_usage_perc``), the prefix-cache counters (queries and hits, in tokens),
the KV connector's (``vllm:external_prefix_cache_queries`` and ``_hits``, in tokens: a P/D
decode request's prompt tokens loaded from its prefill engine, :mod:`.kvtransfer`),
``vllm:num_preemptions``, ``vllm:prompt_tokens``, ``vllm:generation_tokens``,
``vllm:request_success{finished_reason}`` (all five reasons, from zero), the request histograms
(``time_to_first_token_seconds``, ``inter_token_latency_seconds``,
``e2e_request_latency_seconds``, ``request_queue_time_seconds``, ``request_prompt_tokens``,
``request_generation_tokens``) and ``vllm:cache_config_info``. Python's process and GC
collectors are registered too, as in vLLM's registry. Not exposed: the HTTP instrumentator's
``http_*`` families and vLLM's rarer ones (speculative decoding, connector transfer stats,
MFU estimates).
"""

from __future__ import annotations

from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from .config import SimConfig
from .scheduler import FinishedRequest, StepPlan, StepResult

TTFT_BUCKETS: Final[tuple[float, ...]] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS: Final[tuple[float, ...]] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
FINISH_REASONS: Final[tuple[str, ...]] = ("stop", "length", "abort", "error", "repetition")
LABELS: Final[list[str]] = ["engine", "model_name"]
CONTENT_TYPE: Final[str] = CONTENT_TYPE_LATEST


def token_buckets(max_model_len: int) -> list[float]:
    """vLLM's 1-2-5 buckets for token counts, up to ``max_model_len``."""
    buckets: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_model_len:
                return buckets
            buckets.append(float(value))
        exponent += 1


def cache_config_labels(cfg: SimConfig) -> dict[str, str]:
    """The labels of ``vllm:cache_config_info`` for this engine (vLLM's ``CacheConfig``)."""
    size_tokens = (cfg.num_blocks) * cfg.block_size
    return {
        "_block_size_resolved": "True",
        "block_size": str(cfg.block_size),
        "cache_dtype": "auto",
        "cache_hit_alignment_tokens": "None",
        "effective_attention_block_size": str(cfg.block_size),
        "enable_mamba_shared_prefix_checkpoint": "False",
        "enable_prefix_caching": str(cfg.enable_prefix_caching),
        "engine": "0",
        "gpu_memory_utilization": "0.92",
        "hash_block_size": "None",
        "is_attention_free": "False",
        "kv_cache_dtype_skip_layers": "[]",
        "kv_cache_layout": "None",
        "kv_cache_max_concurrency": str(size_tokens / cfg.max_model_len),
        "kv_cache_memory_bytes": "None",
        "kv_cache_size_tokens": str(size_tokens),
        "kv_offloading_backend": "native",
        "kv_offloading_size": "None",
        "kv_sharing_fast_prefill": "False",
        "mamba_block_size": "None",
        "mamba_cache_dtype": "auto",
        "mamba_cache_mode": "none",
        "mamba_page_size_padded": "None",
        "mamba_ssm_cache_dtype": "float32",
        "num_cpu_blocks": "None",
        "num_gpu_blocks": str(cfg.num_blocks),
        "num_gpu_blocks_override": "None",
        "prefix_cache_retention_interval": "0",
        "prefix_caching_hash_algo": "sha256",
        "prefix_match_unit": "None",
        "replayssm_buffer_len": "16",
        "skip_page_size_padded": "None",
        "sliding_window": "None",
        "swa_bounded_replay": "True",
        "use_kda_recoverssm": "False",
        "use_replayssm": "False",
        "user_specified_block_size": "True",
    }


class SimMetrics:
    """The Prometheus registry of one simulated engine.

    Args:
        cfg: the engine (model name, block geometry, context length).
    """

    def __init__(self, cfg: SimConfig) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        labels = {"engine": "0", "model_name": cfg.model_name}
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, LABELS, registry=r, multiprocess_mode="mostrecent")

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, LABELS, registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...] | list[float]) -> Histogram:
            return Histogram(name, doc, LABELS, registry=r, buckets=buckets)

        self.running = gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches."
        ).labels(**labels)
        self.waiting = gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed."
        ).labels(**labels)
        self.kv_usage = gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."
        ).labels(**labels)
        self.prefix_queries = counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
        ).labels(**labels)
        self.prefix_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        ).labels(**labels)
        self.external_queries = counter(
            "vllm:external_prefix_cache_queries",
            "External prefix cache queries from KV connector cross-instance cache sharing, "
            "in terms of number of queried tokens.",
        ).labels(**labels)
        self.external_hits = counter(
            "vllm:external_prefix_cache_hits",
            "External prefix cache hits from KV connector cross-instance cache sharing, in "
            "terms of number of cached tokens.",
        ).labels(**labels)
        self.connector = cfg.kv_transfer is not None
        self.preemptions = counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine."
        ).labels(**labels)
        self.prompt_tokens = counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed."
        ).labels(**labels)
        self.generation_tokens = counter(
            "vllm:generation_tokens", "Number of generation tokens processed."
        ).labels(**labels)
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            ["engine", "finished_reason", "model_name"],
            registry=r,
        )
        self.success = {
            reason: success.labels(engine="0", finished_reason=reason, model_name=cfg.model_name)
            for reason in FINISH_REASONS
        }
        tokens = token_buckets(cfg.max_model_len)
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", tokens
        ).labels(**labels)
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", tokens
        ).labels(**labels)
        self.ttft = histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        ).labels(**labels)
        self.itl = histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS,
        ).labels(**labels)
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        ).labels(**labels)
        self.queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        ).labels(**labels)
        info_labels = cache_config_labels(cfg)
        Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            list(info_labels),
            registry=r,
            multiprocess_mode="mostrecent",
        ).labels(**info_labels).set(1)

    def observe_state(self, *, running: int, waiting: int, kv_usage: float) -> None:
        """Set the scheduler gauges (after every step and every arrival)."""
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)

    def observe_step(self, plan: StepPlan, result: StepResult) -> None:
        """Count what one step did: admissions, preemptions, tokens, latencies."""
        self.observe_admitted(plan)
        if plan.preempted:
            self.preemptions.inc(len(plan.preempted))
        if result.outputs:
            self.generation_tokens.inc(len(result.outputs))
        for itl in result.itl_s:
            self.itl.observe(itl)

    def observe_admitted(self, plan: StepPlan) -> None:
        """Count a plan's admissions, a plan with nothing to compute yet included (its
        requests still loading their KV from a prefill engine)."""
        for request in plan.admitted:
            if request.num_preemptions == 0:
                self.prefix_queries.inc(len(request.prompt))
                self.prefix_hits.inc(request.num_cached_tokens)
                self.prompt_tokens.inc(len(request.prompt))
                if self.connector:
                    self.external_queries.inc(len(request.prompt) - request.num_cached_tokens)
                    self.external_hits.inc(request.num_external_tokens)

    def observe_finished(self, done: FinishedRequest) -> None:
        """Count a request that left the engine, with its latencies."""
        request = done.request
        self.success[done.reason].inc()
        self.request_prompt_tokens.observe(len(request.prompt))
        self.request_generation_tokens.observe(request.num_output)
        self.e2e.observe(done.finished_s - request.arrival_s)
        if request.first_token_s is not None:
            self.ttft.observe(request.first_token_s - request.arrival_s)
        if request.scheduled_s is not None:
            self.queue_time.observe(request.scheduled_s - request.arrival_s)

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)


__all__ = [
    "CONTENT_TYPE",
    "FINISH_REASONS",
    "ITL_BUCKETS",
    "REQUEST_LATENCY_BUCKETS",
    "TTFT_BUCKETS",
    "SimMetrics",
    "cache_config_labels",
    "token_buckets",
]
