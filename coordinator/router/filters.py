"""Filters: each narrows the candidate engines (llm-d's type and parameter names).

=================================  =========================================================
type                               what it does
=================================  =========================================================
decode-filter / prefill-filter     keep engines whose ``llm-d.ai/role`` label fits (llm-d's
                                   rule: decode = role containing "decode", ``both`` or no
                                   role; prefill = role containing "prefill" or ``both``)
by-label                           ``label``, ``validValues``, ``allowsNoLabel``
label-selector-filter,             a Kubernetes LabelSelector: ``matchLabels``,
by-label-selector                  ``matchExpressions`` (In, NotIn, Exists, DoesNotExist);
                                   llm-d renamed by-label-selector to label-selector-filter
                                   (pkg/epp/framework/plugins/scheduling/filter/bylabel/
                                   selector.go): both names load
healthy-filter (Fleet)             drop engines whose last ``/metrics`` scrape failed
free-slot-filter (Fleet)           keep engines with fewer requests in flight than ``slots``
                                   (default: the coordinator's ``--engine-slots``); when
                                   none has a free slot, keep them all
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
prompt-size-filter (Fleet)         requests to GPU tiers by prompt tokens (:mod:`.sizeclass`)
=================================  =========================================================
"""

from __future__ import annotations

from collections.abc import Mapping

from fleet.protocol.errors import ConfigError

from .plugins import (
    Candidate,
    DecayingCounts,
    Filter,
    Params,
    SchedulingContext,
)


class DecodeFilter(Filter):
    TYPE = "decode-filter"

    def keep(self, ctx: SchedulingContext, c: Candidate) -> bool:
        role = c.engine.role  # the role label ("": none), without building the labels
        return not role or role == "both" or "decode" in role


class PrefillFilter(Filter):
    TYPE = "prefill-filter"

    def keep(self, ctx: SchedulingContext, c: Candidate) -> bool:
        role = c.engine.role  # the role label ("": none), without building the labels
        return bool(role) and (role == "both" or "prefill" in role)


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
    TYPE = "label-selector-filter"
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


class LoadImbalanceFilter(Filter):
    TYPE = "load-imbalance-filter"
    PARAMS = ("halfLifeSeconds", "maxOverMean", "slack", "maxLostPrefixTokens")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.counts = DecayingCounts(params.number("halfLifeSeconds", 60, low=0.001))
        self.max_over_mean = params.number("maxOverMean", 1.15, low=1)
        self.slack = params.number("slack", 4, low=0)
        self.max_lost_tokens = params.number("maxLostPrefixTokens", 0, low=0)

    def served(self, engine_id: str, now: float) -> None:
        self.counts.add(engine_id, now)

    def filter(self, ctx: SchedulingContext, candidates: list[Candidate]) -> list[Candidate]:
        if not candidates:
            return candidates
        loads = {c.id: self.counts.get(c.id, ctx.now) for c in candidates}
        mean = sum(loads.values()) / len(loads)
        # never drop every candidate: the least loaded always passes
        limit = max(self.max_over_mean * mean, mean + self.slack, min(loads.values()))
        under = [c for c in candidates if loads[c.id] <= limit]
        if len(under) == len(candidates) or self.max_lost_tokens <= 0:
            return under
        # Some are over the limit. If no engine under it holds any of the prompt yet, leave
        # them out: the request seeds its prefix on another engine (how a hot prefix spreads).
        # Once one does, leave one out only if the request loses at most maxLostPrefixTokens by
        # moving: a new conversation on a spread system prompt moves, a conversation whose
        # history is cached there stays.
        matches = ctx.prefix_match(candidates)
        best = max(matches[c.id][0] * matches[c.id][2] for c in under)
        if best <= 0:
            return under
        return [
            c
            for c in candidates
            if loads[c.id] <= limit
            or matches[c.id][0] * matches[c.id][2] - best > self.max_lost_tokens
        ]


class FreeSlotFilter(Filter):
    """Engines with a free slot: an engine holding its slots' worth of requests is full (a
    request sent there waits in the engine's queue, or slows every sequence of its batch)
    while another has room. Admission keeps a model's requests in flight within its engines'
    slots, so after it some engine nearly always has one."""

    TYPE = "free-slot-filter"
    PARAMS = ("slots",)

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.slots = params.integer("slots", None, low=1)  # None: the context's

    def filter(self, ctx: SchedulingContext, candidates: list[Candidate]) -> list[Candidate]:
        slots = self.slots or ctx.slots_per_engine
        free = [c for c in candidates if c.inflight < slots]
        return free or candidates


class HealthyFilter(Filter):
    TYPE = "healthy-filter"
    USES_METRICS = True

    def keep(self, ctx: SchedulingContext, c: Candidate) -> bool:
        return c.stats is None or c.stats.healthy


class DeprecatedByLabelSelectorFilter(ByLabelSelectorFilter):
    """llm-d's older name, still registered there as a legacy alias (plugins/register.go)."""

    TYPE = "by-label-selector"


TYPES: tuple[type[Filter], ...] = (
    DecodeFilter,
    PrefillFilter,
    ByLabelFilter,
    ByLabelSelectorFilter,
    DeprecatedByLabelSelectorFilter,
    HealthyFilter,
    FreeSlotFilter,
    LoadImbalanceFilter,
)

__all__ = ["TYPES"]
