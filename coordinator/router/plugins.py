"""The scheduling plugins, under llm-d's type names and parameter names.

=================================  =========================================================
type                               what it does
=================================  =========================================================
decode-filter / prefill-filter     keep engines whose ``llm-d.ai/role`` label fits (llm-d's
                                   rule: decode = role containing "decode", ``both`` or no
                                   role; prefill = role containing "prefill" or ``both``)
by-label                           ``label``, ``validValues``, ``allowsNoLabel``
by-label-selector                  a Kubernetes LabelSelector: ``matchLabels``,
                                   ``matchExpressions`` (In, NotIn, Exists, DoesNotExist)
healthy-filter (Fleet)             drop engines whose last ``/metrics`` scrape failed
load-imbalance-filter (Fleet)      drop engines that took more than ``maxOverMean`` (1.15) ×
                                   the candidates' mean of recent requests, or the mean plus
                                   ``slack`` (4) while counts are small (exponentially decayed
                                   counts, ``halfLifeSeconds`` 60): a
                                   hot prefix then spreads to a second engine instead of
                                   piling up on its holder; never drops every candidate.
                                   ``maxLostPrefixTokens`` (0: off): once an engine under
                                   the limit holds part of the prompt, an engine over it is
                                   left out only for requests losing at most that many
                                   cached tokens by moving (new conversations move,
                                   continuing ones stay)
prefix-cache-scorer,               matched / total blocks of the prompt, from the global KV
precise-prefix-cache-scorer        index built from real KV events (both names: Fleet's index
                                   is exact); ``maxPrefixBlocksToMatch`` (256),
                                   ``maxPrefixTokensToMatch``; llm-d's other parameters are
                                   accepted and have no effect
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
max-score-picker                   the highest weighted sum, ties at random
random-picker                      uniform
weighted-random-picker             proportional to the weighted sum
round-robin-picker (Fleet)         in turn, a baseline
single-profile-handler             accepted (one profile is the only kind Fleet runs yet)
prompt-size-filter (Fleet)         requests to GPU tiers by prompt tokens (:mod:`.sizeclass`)
=================================  =========================================================

Scorers whose data is missing (metrics never scraped, or older than the staleness limit) give
0.5 to every candidate, so they neither help nor hurt it.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from fleet.protocol.errors import ConfigError

from ..kvindex import KVIndex
from ..registry import EngineView
from .enginestats import EngineStats
from .prompt import RoutingRequest

ROLE_LABEL = "llm-d.ai/role"
NEUTRAL = 0.5


@dataclass(slots=True)
class Candidate:
    """An engine the pipeline considers, with the signals scorers read."""

    engine: EngineView
    inflight: int = 0
    stats: EngineStats | None = None  # None: never scraped, or stale
    id: str = field(init=False)

    def __post_init__(self) -> None:
        self.id = self.engine.id

    @property
    def labels(self) -> dict[str, str]:
        e = self.engine
        labels = {"fleet.dev/model": e.model, "fleet.dev/node": e.node, "fleet.dev/kind": e.kind}
        if e.role:
            labels[ROLE_LABEL] = e.role
        if e.tier:
            labels["fleet.dev/gpu-tier"] = e.tier
        return labels


class SessionStore:
    """Which engine served a session last, for ``ttl_s`` seconds.

    Args:
        max_sessions: sessions remembered (the oldest go first).
        remember: False where several coordinators serve the fleet: what one remembers the
            others do not know, so a session's engine is its rendezvous-hash engine instead
            (:func:`rendezvous`), which every coordinator computes alike.
    """

    def __init__(self, max_sessions: int = 100_000, *, remember: bool = True) -> None:
        self.max_sessions = max_sessions
        self.remember_sessions = remember
        self._entries: dict[str, tuple[str, float]] = {}

    def get(self, session: str, now: float, ttl_s: float) -> str | None:
        found = self._entries.get(session)
        if found is None or now - found[1] > ttl_s:
            return None
        return found[0]

    def remember(self, session: str, engine_id: str, now: float) -> None:
        if not self.remember_sessions:
            return
        if len(self._entries) >= self.max_sessions and session not in self._entries:
            self._entries.pop(next(iter(self._entries)))  # the oldest insertion
        self._entries.pop(session, None)
        self._entries[session] = (engine_id, now)


def rendezvous(session: str, engine_ids: Sequence[str]) -> str | None:
    """The session's engine among ``engine_ids`` by highest-random-weight hashing (BLAKE2b of
    session and engine id): the same in every process, and an engine joining or leaving moves
    only the sessions it wins or held."""
    if not engine_ids:
        return None
    return max(
        engine_ids,
        key=lambda e: hashlib.blake2b(f"{session}\0{e}".encode(), digest_size=8).digest(),
    )


@dataclass
class SchedulingContext:
    """One request's scheduling: what plugins read, and what they share."""

    request: RoutingRequest
    index: KVIndex
    sessions: SessionStore
    now: float
    rng: random.Random
    # the engines being filtered (filters that compare engines read them)
    candidates: list[Candidate] = field(default_factory=list)
    # engine id -> (matched blocks, total blocks, block size): filled by the prefix scorer
    prefix: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def prefix_match(
        self, candidates: Sequence[Candidate], max_blocks: int | None = None
    ) -> dict[str, tuple[int, int, int]]:
        """Per candidate: blocks of the prompt it holds from the start, of how many."""
        by_size: dict[int, list[str]] = {}
        for c in candidates:
            if c.id not in self.prefix:
                by_size.setdefault(c.engine.block_size, []).append(c.id)
        for size, ids in by_size.items():
            keys = self.request.keys(size)
            total = len(keys) if max_blocks is None else min(len(keys), max_blocks)
            for engine_id, n in self.index.match(keys.head(max_blocks), ids).items():
                self.prefix[engine_id] = (n, total, size)
        return self.prefix


class Params:
    """A plugin's ``parameters``, checked; errors name the plugin."""

    def __init__(self, plugin: str, raw: Any, known: Sequence[str]) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise ConfigError(f"plugins[{plugin}].parameters", raw, "must be a mapping")
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConfigError(
                f"plugins[{plugin}].parameters",
                unknown,
                f"unknown parameter(s); this type takes {sorted(known) or 'none'}",
            )
        self.plugin = plugin
        self.raw: Mapping[str, Any] = raw

    def _bad(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"plugins[{self.plugin}].parameters.{key}", self.raw.get(key), reason)

    def number(self, key: str, default: float, *, low: float | None = None) -> float:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._bad(key, "must be a number")
        if low is not None and value < low:
            raise self._bad(key, f"must be >= {low}")
        return float(value)

    def integer(self, key: str, default: int | None, *, low: int = 0) -> int | None:
        value = self.raw.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, "must be an integer")
        if value < low:
            raise self._bad(key, f"must be >= {low}")
        return value

    def string(self, key: str, default: str | None = None) -> str | None:
        value = self.raw.get(key, default)
        if value is not None and not isinstance(value, str):
            raise self._bad(key, "must be a string")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            raise self._bad(key, "must be true or false")
        return value

    def strings(self, key: str) -> list[str]:
        value = self.raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(key, "must be a list of strings")
        return list(value)


class Plugin:
    """A named plugin of one type."""

    TYPE: ClassVar[str] = ""
    KIND: ClassVar[str] = ""  # filter, scorer, picker, handler
    PARAMS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str, params: Params) -> None:
        self.name = name

    def served(self, engine_id: str, now: float) -> None:
        """The request went to ``engine_id`` (plugins that count traffic override this)."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.TYPE}


# -- filters ------------------------------------------------------------------------------------


class Filter(Plugin):
    KIND = "filter"

    def keep(self, ctx: SchedulingContext, c: Candidate) -> bool:
        raise NotImplementedError


class DecodeFilter(Filter):
    TYPE = "decode-filter"

    def keep(self, ctx: SchedulingContext, c: Candidate) -> bool:
        role = c.labels.get(ROLE_LABEL)
        return role is None or role == "both" or "decode" in role


class PrefillFilter(Filter):
    TYPE = "prefill-filter"

    def keep(self, ctx: SchedulingContext, c: Candidate) -> bool:
        role = c.labels.get(ROLE_LABEL)
        return role is not None and (role == "both" or "prefill" in role)


class ByLabelFilter(Filter):
    TYPE = "by-label"
    PARAMS = ("label", "validValues", "allowsNoLabel")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        label = params.string("label")
        if not label:
            raise ConfigError(f"plugins[{name}].parameters.label", label, "is required")
        self.label = label
        self.valid = set(params.strings("validValues"))
        self.allows_no_label = params.boolean("allowsNoLabel", False)

    def keep(self, ctx: SchedulingContext, c: Candidate) -> bool:
        value = c.labels.get(self.label)
        return self.allows_no_label if value is None else value in self.valid


class ByLabelSelectorFilter(Filter):
    TYPE = "by-label-selector"
    PARAMS = ("matchLabels", "matchExpressions")
    OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        where = f"plugins[{name}].parameters"
        labels = params.raw.get("matchLabels") or {}
        if not isinstance(labels, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise ConfigError(f"{where}.matchLabels", labels, "must map label names to values")
        self.match_labels = dict(labels)
        self.expressions: list[tuple[str, str, set[str]]] = []
        for i, expr in enumerate(params.raw.get("matchExpressions") or []):
            key, op, values = (
                (expr.get("key"), expr.get("operator"), expr.get("values", []))
                if isinstance(expr, Mapping)
                else (None, None, None)
            )
            if not isinstance(key, str) or op not in self.OPERATORS:
                raise ConfigError(
                    f"{where}.matchExpressions[{i}]",
                    expr,
                    f"needs a key and an operator of {list(self.OPERATORS)}",
                )
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise ConfigError(
                    f"{where}.matchExpressions[{i}].values", values, "must be strings"
                )
            self.expressions.append((key, op, set(values)))

    def keep(self, ctx: SchedulingContext, c: Candidate) -> bool:
        labels = c.labels
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        for key, op, values in self.expressions:
            value = labels.get(key)
            ok = {
                "In": value is not None and value in values,
                "NotIn": value is None or value not in values,
                "Exists": value is not None,
                "DoesNotExist": value is None,
            }[op]
            if not ok:
                return False
        return True


class DecayingCounts:
    """Per-engine request counts that halve every ``half_life_s`` seconds."""

    def __init__(self, half_life_s: float) -> None:
        self.half_life_s = half_life_s
        self._counts: dict[str, tuple[float, float]] = {}  # engine -> (count, as of)

    def get(self, engine_id: str, now: float) -> float:
        count, at = self._counts.get(engine_id, (0.0, now))
        return count * 0.5 ** ((now - at) / self.half_life_s) if now > at else count

    def add(self, engine_id: str, now: float) -> None:
        self._counts[engine_id] = (self.get(engine_id, now) + 1.0, now)


class LoadImbalanceFilter(Filter):
    TYPE = "load-imbalance-filter"
    PARAMS = ("halfLifeSeconds", "maxOverMean", "slack", "maxLostPrefixTokens")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.counts = DecayingCounts(params.number("halfLifeSeconds", 60, low=0.001))
        self.max_over_mean = params.number("maxOverMean", 1.15, low=1)
        self.slack = params.number("slack", 4, low=0)
        self.max_lost_tokens = params.number("maxLostPrefixTokens", 0, low=0)
        # (context, limit, loads) of the request being filtered
        self._seen: tuple[SchedulingContext, float, dict[str, float]] | None = None
        # the request's most prefix tokens an engine under the limit holds (once it is needed)
        self._best_under: tuple[SchedulingContext, int] | None = None

    def served(self, engine_id: str, now: float) -> None:
        self.counts.add(engine_id, now)

    def keep(self, ctx: SchedulingContext, c: Candidate) -> bool:
        seen = self._seen
        if seen is None or seen[0] is not ctx:
            loads = {x.id: self.counts.get(x.id, ctx.now) for x in ctx.candidates}
            mean = sum(loads.values()) / len(loads) if loads else 0.0
            # never drop every candidate: the least loaded always passes
            limit = max(
                self.max_over_mean * mean, mean + self.slack, min(loads.values(), default=0.0)
            )
            seen = self._seen = (ctx, limit, loads)
        limit, loads = seen[1], seen[2]
        load = loads.get(c.id)
        if (self.counts.get(c.id, ctx.now) if load is None else load) <= limit:
            return True
        if self.max_lost_tokens <= 0:
            return False
        # Over the limit. If no engine under the limit holds any of the prompt yet, leave this
        # one out: the request seeds its prefix on another engine (how a hot prefix spreads).
        # Once one does, leave it out only if the request loses at most maxLostPrefixTokens by
        # moving: a new conversation on a spread system prompt moves, a conversation whose
        # history is cached here stays.
        matches = ctx.prefix_match(ctx.candidates)
        blocks, _, size = matches[c.id]
        if self._best_under is None or self._best_under[0] is not ctx:
            # The same for every engine over the limit (none of them is under it): once.
            best = max(
                (
                    matches[x.id][0] * matches[x.id][2]
                    for x in ctx.candidates
                    if loads.get(x.id, 0.0) <= limit
                ),
                default=0,
            )
            self._best_under = (ctx, best)
        best = self._best_under[1]
        return best > 0 and blocks * size - best > self.max_lost_tokens


class HealthyFilter(Filter):
    TYPE = "healthy-filter"

    def keep(self, ctx: SchedulingContext, c: Candidate) -> bool:
        return c.stats is None or c.stats.healthy


# -- scorers ------------------------------------------------------------------------------------


class Scorer(Plugin):
    KIND = "scorer"
    USES_METRICS: ClassVar[bool] = False

    def score(self, ctx: SchedulingContext, candidates: Sequence[Candidate]) -> dict[str, float]:
        raise NotImplementedError


class PrefixCacheScorer(Scorer):
    TYPE = "prefix-cache-scorer"
    PARAMS = (
        "blockSizeTokens",
        "maxPrefixBlocksToMatch",
        "maxPrefixTokensToMatch",
        "lruCapacityPerServer",
        "autoTune",
    )

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        params.integer("blockSizeTokens", None, low=1)  # the engines' own block size is used
        params.integer("lruCapacityPerServer", None, low=1)
        params.boolean("autoTune", True)
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
    )

    def __init__(self, name: str, params: Params) -> None:
        Plugin.__init__(self, name, params)
        for key in ("tokenProcessorConfig", "indexerConfig", "kvEventsConfig"):
            if not isinstance(params.raw.get(key, {}), Mapping):
                raise ConfigError(f"plugins[{name}].parameters.{key}", params.raw[key], "mapping")
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


# -- pickers ------------------------------------------------------------------------------------


class Picker(Plugin):
    KIND = "picker"
    PARAMS = ("maxNumOfEndpoints",)

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        n = params.integer("maxNumOfEndpoints", 1, low=1)
        if n != 1:
            raise ConfigError(f"plugins[{name}].parameters.maxNumOfEndpoints", n, "must be 1")

    def pick(self, ctx: SchedulingContext, totals: Sequence[tuple[Candidate, float]]) -> Candidate:
        raise NotImplementedError


class MaxScorePicker(Picker):
    TYPE = "max-score-picker"

    def pick(self, ctx: SchedulingContext, totals: Sequence[tuple[Candidate, float]]) -> Candidate:
        best = max(t for _, t in totals)
        return ctx.rng.choice([c for c, t in totals if t >= best - 1e-12])


class RandomPicker(Picker):
    TYPE = "random-picker"

    def pick(self, ctx: SchedulingContext, totals: Sequence[tuple[Candidate, float]]) -> Candidate:
        return ctx.rng.choice([c for c, _ in totals])


class WeightedRandomPicker(Picker):
    TYPE = "weighted-random-picker"

    def pick(self, ctx: SchedulingContext, totals: Sequence[tuple[Candidate, float]]) -> Candidate:
        weights = [max(t, 0.0) for _, t in totals]
        if sum(weights) <= 0:
            return ctx.rng.choice([c for c, _ in totals])
        return ctx.rng.choices([c for c, _ in totals], weights=weights)[0]


class RoundRobinPicker(Picker):
    TYPE = "round-robin-picker"

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self._turn = 0

    def pick(self, ctx: SchedulingContext, totals: Sequence[tuple[Candidate, float]]) -> Candidate:
        ordered = sorted((c for c, _ in totals), key=lambda c: c.id)
        self._turn += 1
        return ordered[(self._turn - 1) % len(ordered)]


class SingleProfileHandler(Plugin):
    TYPE = "single-profile-handler"
    KIND = "handler"


PLUGIN_TYPES: dict[str, Callable[[str, Params], Plugin]] = {}
for _cls in (
    DecodeFilter,
    PrefillFilter,
    ByLabelFilter,
    ByLabelSelectorFilter,
    HealthyFilter,
    LoadImbalanceFilter,
    PrefixCacheScorer,
    PrecisePrefixCacheScorer,
    LoadAwareScorer,
    QueueScorer,
    KVCacheUtilizationScorer,
    ActiveRequestScorer,
    RecentLoadScorer,
    SessionAffinityScorer,
    MaxScorePicker,
    RandomPicker,
    WeightedRandomPicker,
    RoundRobinPicker,
    SingleProfileHandler,
):
    PLUGIN_TYPES[_cls.TYPE] = _cls


def make_plugin(name: str, type_: str, raw_params: Any) -> Plugin:
    """Build one plugin.

    Raises:
        ConfigError: unknown type or bad parameters (the message names the plugin).
    """
    cls = PLUGIN_TYPES.get(type_)
    if cls is None:
        raise ConfigError(
            f"plugins[{name}].type", type_, f"unknown plugin type; Fleet has {sorted(PLUGIN_TYPES)}"
        )
    known = getattr(cls, "PARAMS", ())
    return cls(name, Params(name, raw_params, known))


__all__ = [
    "PLUGIN_TYPES",
    "Candidate",
    "Filter",
    "Params",
    "Picker",
    "Plugin",
    "SchedulingContext",
    "Scorer",
    "SessionStore",
    "make_plugin",
    "rendezvous",
]
