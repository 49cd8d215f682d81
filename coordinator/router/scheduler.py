"""The scheduling profiles run over the candidate engines: filter, score, pick.

Sans-I/O: the caller passes the engines, the in-flight counts and the time. The profile handler
(:mod:`.pd`) says which profiles run: the primary (decode) profile picks the engine that answers;
with a P/D handler whose decider says to split, the prefill profile then picks a prefill engine
(:attr:`Decision.prefill`). With ``explain`` the decision carries every candidate's filter results
and per-scorer scores (what ``fleet route explain`` prints and ``POST /api/v1/route/explain``
returns).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..kvindex import KVIndex
from ..registry import EngineView
from .enginestats import EngineStatsStore
from .pd import Decider, ProfileHandler, SingleProfileHandler, Split
from .plugins import (
    Candidate,
    Filter,
    Params,
    Picker,
    Plugin,
    SchedulingContext,
    Scorer,
    SessionStore,
)
from .prompt import RoutingRequest
from .scorers import PrefixCacheScorer, SessionAffinityScorer
from .tally import SchedulerTally


@dataclass(frozen=True)
class WeightedScorer:
    scorer: Scorer
    weight: float


@dataclass(frozen=True)
class Profile:
    """A scheduling profile: filters in order, weighted scorers, one picker."""

    name: str
    filters: tuple[Filter, ...]
    scorers: tuple[WeightedScorer, ...]
    picker: Picker

    def plugins(self) -> list[Plugin]:
        return [*self.filters, *(w.scorer for w in self.scorers), self.picker]

    @property
    def needs_tokens(self) -> bool:
        return any(isinstance(w.scorer, PrefixCacheScorer) for w in self.scorers)

    @property
    def uses_metrics(self) -> bool:
        return any(w.scorer.USES_METRICS for w in self.scorers) or any(
            f.TYPE == "healthy-filter" for f in self.filters
        )


@dataclass(frozen=True)
class SchedulingConfig:
    """What an EndpointPickerConfig builds (:func:`.config.load_config`).

    Attributes:
        profiles: the scheduling profiles by name.
        handler: the profile handler.
        decode: the primary profile: its pick answers the request.
        prefill: the profile that picks a prefill engine (None: requests are never split).
        decider: says, per request, whether to split (None: never).
        notes: what the loader logged once (names accepted and ignored, deprecated forms).
    """

    profiles: Mapping[str, Profile]
    handler: ProfileHandler
    decode: str
    prefill: str | None = None
    decider: Decider | None = None
    notes: tuple[str, ...] = ()

    @classmethod
    def single(cls, profile: Profile) -> SchedulingConfig:
        """One profile under a ``single-profile-handler``."""
        handler = SingleProfileHandler(SingleProfileHandler.TYPE, Params("", None, ()))
        return cls({profile.name: profile}, handler, profile.name)

    @property
    def primary(self) -> Profile:
        return self.profiles[self.decode]

    @property
    def prefill_profile(self) -> Profile | None:
        return self.profiles[self.prefill] if self.prefill and self.decider else None

    def plugins(self) -> list[Plugin]:
        """Every plugin a request can run, once each."""
        seen: dict[int, Plugin] = {}
        for profile in (self.primary, self.prefill_profile):
            for plugin in profile.plugins() if profile else ():
                seen.setdefault(id(plugin), plugin)
        return list(seen.values())

    @property
    def needs_tokens(self) -> bool:
        """The prompt's tokens are read (a prefix scorer, or a decider counting tokens)."""
        runs = [p for p in (self.primary, self.prefill_profile) if p]
        decider = self.decider is not None and self.decider.NEEDS_TOKENS
        return decider or any(p.needs_tokens for p in runs)

    @property
    def uses_metrics(self) -> bool:
        return any(p.uses_metrics for p in (self.primary, self.prefill_profile) if p)


@dataclass
class Decision:
    """What the pipeline chose, and (with ``explain``) why.

    Attributes:
        engine: the engine that answers (the decode engine with P/D); None: every one filtered.
        prefix_tokens: prompt tokens ``engine`` holds.
        scheduling_ms: time spent filtering, scoring and picking (every profile run).
        candidates: with ``explain``, the primary profile's candidates.
        prefill: the prefill engine when the request is split, else None.
        pd: the P/D decider's verdict (None: no decider configured, or no engine).
        prefill_candidates: with ``explain`` and a split, the prefill profile's candidates.
    """

    engine: EngineView | None
    prefix_tokens: int = 0
    scheduling_ms: float = 0.0
    candidates: list[dict[str, Any]] = field(default_factory=list)
    prefill: EngineView | None = None
    pd: Split | None = None
    prefill_candidates: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "selected": self.engine.id if self.engine else None,
            "prefix_tokens": self.prefix_tokens,
            "scheduling_ms": round(self.scheduling_ms, 4),
            "candidates": self.candidates,
            "prefill": self.prefill.id if self.prefill else None,
            "pd": self.pd.as_json() if self.pd else None,
            "prefill_candidates": self.prefill_candidates,
        }


class Scheduler:
    """Runs the configured profiles for each request.

    Args:
        config: what the EndpointPickerConfig built (a lone :class:`Profile` is run under a
            single-profile handler).
        index: the global KV-block index.
        stats: the engines' scraped metrics.
        sessions: session → engine memory (session affinity).
        rng: tie-breaking randomness.
        slots_per_engine: requests an engine holds before it is full (``free-slot-filter``).
        clock: for ``scheduling_ms`` and each plugin's time.

    ``tally`` counts every decision but explain runs (:mod:`.tally`, exported as metrics).
    """

    def __init__(
        self,
        config: SchedulingConfig | Profile,
        index: KVIndex,
        *,
        stats: EngineStatsStore | None = None,
        sessions: SessionStore | None = None,
        rng: random.Random | None = None,
        slots_per_engine: int = 64,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if isinstance(config, Profile):
            config = SchedulingConfig.single(config)
        self.config = config
        self.index = index
        self.stats = stats or EngineStatsStore()
        self.sessions = sessions or SessionStore()
        self.rng = rng or random.Random()
        self.clock = clock
        self.slots_per_engine = slots_per_engine
        self.tally = SchedulerTally()
        self._plugins: tuple[SchedulingConfig, list[Plugin]] = (config, config.plugins())

    @property
    def profile(self) -> Profile:
        """The primary profile (the decode profile with P/D)."""
        return self.config.primary

    @property
    def needs_tokens(self) -> bool:
        return self.config.needs_tokens

    @property
    def uses_metrics(self) -> bool:
        return self.config.uses_metrics

    def schedule(
        self,
        request: RoutingRequest,
        engines: Sequence[EngineView],
        inflight: Callable[[str], int],
        now: float,
        *,
        explain: bool = False,
    ) -> Decision:
        """Choose an engine for ``request`` among ``engines`` (None if every one is filtered)
        and, when the P/D decider says to split, a prefill engine among the others."""
        clock, tally = self.clock, self.tally
        started = clock()
        prefix: dict[str, tuple[int, int, int]] = {}  # one prompt: matches shared by profiles
        candidates = [Candidate(e, inflight(e.id), self.stats.get(e.id, now)) for e in engines]
        ctx = self._context(request, now, prefix)
        chosen, notes, affinity = self._run(self.config.primary, ctx, candidates, explain)
        if chosen is None:
            elapsed = clock() - started
            if not explain:
                tally.decided("no_engine", elapsed)
            return Decision(None, 0, elapsed * 1000, notes)
        matched, total_blocks, block_size = ctx.prefix_match([chosen])[chosen.id]
        decision = Decision(chosen.engine, matched * block_size, 0.0, notes)
        prefill = self.config.prefill_profile
        if prefill is not None and self.config.decider is not None:
            tokens = None if request.token_ids is None else len(request.token_ids)
            split = self.config.decider.decide(tokens, decision.prefix_tokens)
            if split.split:
                others = [c for c in candidates if c.id != chosen.id]
                ctx = self._context(request, now, prefix)
                picked, decision.prefill_candidates, _ = self._run(prefill, ctx, others, explain)
                if picked is None:
                    why = f"{split.reason}; no prefill engine passes profile {prefill.name!r}"
                    split = dataclasses.replace(split, split=False, reason=why)
                else:
                    decision.prefill = picked.engine
            decision.pd = split
        elapsed = clock() - started
        decision.scheduling_ms = elapsed * 1000
        if not explain:
            tally.decided("picked", elapsed)
            if total_blocks:
                tally.prefix(matched, total_blocks)
            if affinity is not None and request.session_id:
                if affinity.get(chosen.id, 0.0) > 0:
                    tally.session("hit")
                else:
                    tally.session("miss" if any(affinity.values()) else "none")
        return decision

    def _context(
        self, request: RoutingRequest, now: float, prefix: dict[str, tuple[int, int, int]]
    ) -> SchedulingContext:
        # A context per profile run (filters remember their request by its context), sharing
        # the prompt's prefix matches.
        ctx = SchedulingContext(request, self.index, self.sessions, now, self.rng)
        ctx.prefix = prefix
        ctx.slots_per_engine = self.slots_per_engine
        return ctx

    def _run(
        self,
        profile: Profile,
        ctx: SchedulingContext,
        candidates: list[Candidate],
        explain: bool,
    ) -> tuple[Candidate | None, list[dict[str, Any]], dict[str, float] | None]:
        """One profile over ``candidates``: the pick (None: all filtered); with ``explain``
        each candidate's filter results and scores; the session-affinity scores (None: the
        profile has no session-affinity scorer). Each plugin's time goes to the tally (one
        clock read per plugin: each starts where the one before ended)."""
        clock, tally = self.clock, self.tally
        begun = clock()
        notes: dict[str, dict[str, Any]] = {}
        if explain:
            notes = {c.id: {"engine": c.id, "url": c.engine.url, "filters": {}} for c in candidates}
        for f in profile.filters:
            ctx.candidates = candidates
            kept = []
            for c in candidates:
                ok = f.keep(ctx, c)
                if explain:
                    notes[c.id]["filters"][f.name] = ok
                if ok:
                    kept.append(c)
            candidates = kept
            ended = clock()
            tally.plugin(f.name, "filter", f.TYPE, ended - begun)
            begun = ended
        if not candidates:
            return None, list(notes.values()), None
        totals = {c.id: 0.0 for c in candidates}
        affinity: dict[str, float] | None = None
        for ws in profile.scorers:
            scores = ws.scorer.score(ctx, candidates)
            ended = clock()
            tally.plugin(ws.scorer.name, "scorer", ws.scorer.TYPE, ended - begun)
            begun = ended
            if isinstance(ws.scorer, SessionAffinityScorer):
                affinity = scores
            for c in candidates:
                value = scores.get(c.id, 0.0)
                totals[c.id] += ws.weight * value
                if explain:
                    notes[c.id].setdefault("scores", {})[ws.scorer.name] = {
                        "score": round(value, 4),
                        "weight": ws.weight,
                    }
        picker = profile.picker
        chosen = picker.pick(ctx, [(c, totals[c.id]) for c in candidates])
        tally.plugin(picker.name, "picker", picker.TYPE, clock() - begun)
        if explain:
            for c in candidates:
                note = notes[c.id]
                note["total"] = round(totals[c.id], 4)
                n, total_blocks, size = ctx.prefix_match([c])[c.id]
                note["prefix"] = {"blocks": n, "of": total_blocks, "tokens": n * size}
                note["inflight"] = c.inflight
                note["selected"] = c.id == chosen.id
        return chosen, list(notes.values()), affinity

    def served(self, request: RoutingRequest, engine_id: str, now: float) -> None:
        """Record that ``engine_id`` took the request (session affinity, traffic counts)."""
        session = request.session_id
        if session:
            self.sessions.remember(session, engine_id, now)
        config, plugins = self._plugins
        if config is not self.config:  # replaced since: list its plugins again
            plugins = self.config.plugins()
            self._plugins = (self.config, plugins)
        for plugin in plugins:
            plugin.served(engine_id, now)


__all__ = ["Decision", "Profile", "Scheduler", "SchedulingConfig", "WeightedScorer"]
