"""Scorers: each gives every candidate a score in [0, 1] (llm-d's type and parameter names).

=================================  =========================================================
type                               what it does
=================================  =========================================================
prefix-cache-scorer,               matched / total blocks of the prompt, from the global KV
precise-prefix-cache-scorer        index built from real KV events (both names: Fleet's index
                                   is exact); ``maxPrefixBlocksToMatch`` (256),
                                   ``maxPrefixTokensToMatch``; llm-d's other parameters are
                                   accepted and have no effect (block sizes: Fleet matches
                                   with each engine's real KV block size)
load-aware-scorer                  ``threshold`` (128): 0.5 with nothing waiting, else
                                   0.5 × (1 − min(waiting, threshold) / threshold)
queue-scorer                       (max − waiting) / (max − min) over the candidates; all
                                   equal → 1
kv-cache-utilization-scorer        1 − ``vllm:kv_cache_usage_perc``
active-request-scorer              from the coordinator's own in-flight counts: 1 at or
                                   below ``idleThreshold`` (0), else falling linearly to 0 at
                                   the busiest candidate; ``maxBusyScore`` (1) scales it
recent-load-scorer (Fleet)         1 − recent / busiest recent, over decayed counts of the
                                   requests the coordinator sent (``halfLifeSeconds`` 60): a
                                   new prefix goes to the engine with the least traffic
session-affinity-scorer            1 for the engine that served the request's session
                                   (``x-session-id``, or llm-d's ``x-session-token``) within
                                   ``ttlSeconds`` (300), else 0; with several coordinators
                                   (no shared memory of sessions) 1 for the session's
                                   rendezvous-hash engine among the candidates, the same on
                                   every coordinator
=================================  =========================================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fleet.protocol.errors import ConfigError

from .plugins import (
    NEUTRAL,
    Candidate,
    DecayingCounts,
    Params,
    Plugin,
    SchedulingContext,
    Scorer,
    rendezvous,
)

# llm-d's block-size parameters of the prefix scorer, current and older: blockSizeTokens and the
# deprecated blockSize (characters) in llm-d-inference-scheduler
# pkg/epp/framework/plugins/requestcontrol/dataproducer/approximateprefix/types.go; hashBlockSize
# before gateway-api-inference-extension renamed it (a7e4c125, "Rename prefix scorer HashBlockSize
# to BlockSize"), in llm-d's deploy/config/sim-epp-config.yaml until a80ba25f.
BLOCK_SIZE_PARAMS = ("blockSizeTokens", "blockSize", "hashBlockSize")


INDEX = "the index is Fleet's own, keyed on token content and fed by the engines' KV events"


def unused(name: str, params: Params, keys: tuple[str, ...], why: str) -> list[str]:
    """A note for each of ``keys`` given: accepted, no effect, and ``why``."""
    return [
        f"plugins[{name}].parameters.{key}: accepted, no effect: {why}"
        for key in keys
        if key in params.raw
    ]


def block_size_notes(name: str, params: Params) -> list[str]:
    """Check llm-d's block-size parameters; a note for each given (Fleet uses none of them)."""
    for key in BLOCK_SIZE_PARAMS:
        params.integer(key, None, low=1)
    why = "Fleet matches prefixes in each engine's own KV block size, learned from its KV events"
    return unused(name, params, BLOCK_SIZE_PARAMS, why)


class PrefixCacheScorer(Scorer):
    TYPE = "prefix-cache-scorer"
    NEEDS_TOKENS = True
    PARAMS = (
        *BLOCK_SIZE_PARAMS,
        "maxPrefixBlocksToMatch",
        "maxPrefixTokensToMatch",
        "lruCapacityPerServer",
        "autoTune",
    )

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.notes += block_size_notes(name, params)
        params.integer("lruCapacityPerServer", None, low=1)
        params.boolean("autoTune", True)
        self.notes += unused(name, params, ("lruCapacityPerServer", "autoTune"), INDEX)
        self.max_blocks = params.integer("maxPrefixBlocksToMatch", 256, low=1)
        self.max_tokens = params.integer("maxPrefixTokensToMatch", None, low=1)

    def score(self, ctx: SchedulingContext, candidates: Sequence[Candidate]) -> dict[str, float]:
        by_size: dict[int, list[Candidate]] = {}
        for c in candidates:
            by_size.setdefault(c.engine.block_size, []).append(c)
        out = {}
        for size, group in by_size.items():  # one walk of the index per block size
            cap = self.max_blocks
            if self.max_tokens is not None:
                cap = min(cap or self.max_tokens, self.max_tokens // size)
            matches = ctx.prefix_match(group, cap)
            for c in group:
                matched, total, _ = matches[c.id]
                out[c.id] = matched / total if total else 0.0
        return out


class PrecisePrefixCacheScorer(PrefixCacheScorer):
    TYPE = "precise-prefix-cache-scorer"
    PARAMS = (
        "tokenProcessorConfig",
        "indexerConfig",
        "kvEventsConfig",
        "maxPrefixBlocksToMatch",
        "maxPrefixTokensToMatch",
        # llm-d-inference-scheduler pkg/epp/framework/plugins/scheduling/scorer/
        # preciseprefixcache/precise_prefix_cache.go
        "speculativeIndexing",
        "speculativeTTL",
    )

    def __init__(self, name: str, params: Params) -> None:
        Plugin.__init__(self, name, params)
        for key in ("tokenProcessorConfig", "indexerConfig", "kvEventsConfig"):
            if not isinstance(params.raw.get(key, {}), Mapping):
                raise ConfigError(f"plugins[{name}].parameters.{key}", params.raw[key], "mapping")
        self.notes += unused(
            name,
            params,
            ("tokenProcessorConfig", "indexerConfig"),
            "the coordinator tokenizes with the model's own tokenizer; " + INDEX,
        )
        self.notes += unused(
            name, params, ("kvEventsConfig",), "Fleet's agents relay each engine's KV events"
        )
        params.boolean("speculativeIndexing", False)
        params.string("speculativeTTL")
        self.notes += unused(name, params, ("speculativeIndexing", "speculativeTTL"), INDEX)
        self.max_blocks = params.integer("maxPrefixBlocksToMatch", 256, low=1)
        self.max_tokens = params.integer("maxPrefixTokensToMatch", None, low=1)


class LoadAwareScorer(Scorer):
    TYPE = "load-aware-scorer"
    PARAMS = ("threshold",)
    USES_METRICS = True

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.threshold = params.number("threshold", 128, low=1)

    def score(self, ctx: SchedulingContext, candidates: Sequence[Candidate]) -> dict[str, float]:
        out = {}
        for c in candidates:
            if c.stats is None:
                out[c.id] = NEUTRAL
            else:
                waiting = min(c.stats.waiting, self.threshold)
                out[c.id] = 0.5 * (1 - waiting / self.threshold)
        return out


class QueueScorer(Scorer):
    TYPE = "queue-scorer"
    USES_METRICS = True

    def score(self, ctx: SchedulingContext, candidates: Sequence[Candidate]) -> dict[str, float]:
        known = {c.id: c.stats.waiting for c in candidates if c.stats is not None}
        if not known:
            return {c.id: NEUTRAL for c in candidates}
        low, high = min(known.values()), max(known.values())
        out = {}
        for c in candidates:
            w = known.get(c.id)
            out[c.id] = NEUTRAL if w is None else 1.0 if high == low else (high - w) / (high - low)
        return out


class KVCacheUtilizationScorer(Scorer):
    TYPE = "kv-cache-utilization-scorer"
    USES_METRICS = True

    def score(self, ctx: SchedulingContext, candidates: Sequence[Candidate]) -> dict[str, float]:
        return {
            c.id: NEUTRAL if c.stats is None else max(0.0, 1.0 - c.stats.kv_usage)
            for c in candidates
        }


class ActiveRequestScorer(Scorer):
    TYPE = "active-request-scorer"
    PARAMS = ("idleThreshold", "maxBusyScore", "requestTimeout")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.idle = params.number("idleThreshold", 0, low=0)
        self.max_busy = params.number("maxBusyScore", 1.0, low=0)
        params.string("requestTimeout")

    def score(self, ctx: SchedulingContext, candidates: Sequence[Candidate]) -> dict[str, float]:
        busiest = max((c.inflight for c in candidates), default=0)
        out = {}
        for c in candidates:
            if c.inflight <= self.idle:
                out[c.id] = 1.0
            else:
                out[c.id] = self.max_busy * (1.0 - c.inflight / busiest) if busiest else 1.0
        return out


class RecentLoadScorer(Scorer):
    TYPE = "recent-load-scorer"
    PARAMS = ("halfLifeSeconds",)

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.counts = DecayingCounts(params.number("halfLifeSeconds", 60, low=0.001))

    def served(self, engine_id: str, now: float) -> None:
        self.counts.add(engine_id, now)

    def score(self, ctx: SchedulingContext, candidates: Sequence[Candidate]) -> dict[str, float]:
        loads = {c.id: self.counts.get(c.id, ctx.now) for c in candidates}
        busiest = max(loads.values(), default=0.0)
        return {e: 1.0 - n / busiest if busiest > 0 else 1.0 for e, n in loads.items()}


class SessionAffinityScorer(Scorer):
    TYPE = "session-affinity-scorer"
    SESSION_AFFINITY = True
    PARAMS = ("ttlSeconds",)

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.ttl_s = params.number("ttlSeconds", 300, low=0)

    def score(self, ctx: SchedulingContext, candidates: Sequence[Candidate]) -> dict[str, float]:
        session = ctx.request.session_id
        engine = None
        if session and ctx.sessions.remember_sessions:
            engine = ctx.sessions.get(session, ctx.now, self.ttl_s)
        elif session:
            engine = rendezvous(session, [c.id for c in candidates])
        return {c.id: 1.0 if c.id == engine else 0.0 for c in candidates}


TYPES: tuple[type[Scorer], ...] = (
    PrefixCacheScorer,
    PrecisePrefixCacheScorer,
    LoadAwareScorer,
    QueueScorer,
    KVCacheUtilizationScorer,
    ActiveRequestScorer,
    RecentLoadScorer,
    SessionAffinityScorer,
)

__all__ = ["TYPES", "PrefixCacheScorer"]
