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
import functools
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
        """A plugin reads the prompt's tokens (it declares ``NEEDS_TOKENS``)."""
        return any(p.NEEDS_TOKENS for p in self.plugins())

    @property
    def uses_metrics(self) -> bool:
        """A plugin reads the engines' scraped metrics (it declares ``USES_METRICS``)."""
        return any(p.USES_METRICS for p in self.plugins())


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

    @functools.cached_property
    def needs_tokens(self) -> bool:
        """The prompt's tokens are read (a plugin declares it, or a decider counts them)."""
        runs = [p for p in (self.primary, self.prefill_profile) if p]
        decider = self.decider is not None and self.decider.NEEDS_TOKENS
        return decider or any(p.needs_tokens for p in runs)

    @functools.cached_property
    def uses_metrics(self) -> bool:
        return any(p.uses_metrics for p in (self.primary, self.prefill_profile) if p)


@dataclass
class Decision:
    """What the pipeline chose, and (with ``explain``) why.

    Attributes:
        engine: the engine that answers (the decode engine with P/D); None: every one filtered.
        prefix_tokens: prompt tokens ``engine`` holds.
        scheduling_ms: time spent filtering, scoring and picking (every profile run).
        plugin_runs: each plugin run and its seconds (every profile run); :attr:`plugin_ms`
            sums them by plugin name when read, so a request nobody explains builds no dict.
        candidates: with ``explain``, the primary profile's candidates.
        prefill: the prefill engine when the request is split, else None.
        pd: the P/D decider's verdict (None: no decider configured, or no engine).
        prefill_candidates: with ``explain`` and a split, the prefill profile's candidates.
    """

    engine: EngineView | None
    prefix_tokens: int = 0
    scheduling_ms: float = 0.0
    plugin_runs: list[tuple[Plugin, float]] = field(default_factory=list)  # (plugin, seconds)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    prefill: EngineView | None = None
    pd: Split | None = None
    prefill_candidates: list[dict[str, Any]] = field(default_factory=list)

    @property
    def plugin_ms(self) -> dict[str, float]:
        """Milliseconds per plugin name (a plugin that served two profiles: both runs)."""
        out: dict[str, float] = {}
        for plugin, seconds in self.plugin_runs:
            out[plugin.name] = out.get(plugin.name, 0.0) + seconds * 1000
        return out

    def as_json(self) -> dict[str, Any]:
        return {
            "selected": self.engine.id if self.engine else None,
            "prefix_tokens": self.prefix_tokens,
            "scheduling_ms": round(self.scheduling_ms, 4),
            "plugin_ms": {name: round(ms, 4) for name, ms in self.plugin_ms.items()},
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
        times: list[tuple[Plugin, float]] = []  # each plugin run's seconds, every profile
        chosen, notes, affinity = self._run(self.config.primary, ctx, candidates, explain, times)
        if chosen is None:
            elapsed = clock() - started
            self._tally_plugins(times)  # explain runs' plugins are timed too
            if not explain:
                tally.decided("no_engine", elapsed)
            return Decision(None, 0, elapsed * 1000, times, notes)
        matched, total_blocks, block_size = ctx.prefix_match([chosen])[chosen.id]
        decision = Decision(chosen.engine, matched * block_size, 0.0, times, notes)
        prefill = self.config.prefill_profile
        if prefill is not None and self.config.decider is not None:
            tokens = None if request.token_ids is None else len(request.token_ids)
            split = self.config.decider.decide(tokens, decision.prefix_tokens)
            if split.split:
                others = [c for c in candidates if c.id != chosen.id]
                ctx = self._context(request, now, prefix)
                picked, decision.prefill_candidates, _ = self._run(
                    prefill, ctx, others, explain, times
                )
                if picked is None:
                    why = f"{split.reason}; no prefill engine passes profile {prefill.name!r}"
                    split = dataclasses.replace(split, split=False, reason=why)
                else:
                    decision.prefill = picked.engine
            decision.pd = split
        elapsed = clock() - started
        decision.scheduling_ms = elapsed * 1000
        self._tally_plugins(times)  # explain runs' plugins are timed too
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

    def _tally_plugins(self, times: list[tuple[Plugin, float]]) -> None:
        self.tally.plugin_runs(times)

    def _current_plugins(self) -> list[Plugin]:
        config, plugins = self._plugins
        if config is not self.config:  # replaced since: list its plugins again
            plugins = self.config.plugins()
            self._plugins = (self.config, plugins)
        return plugins

    def _context(
        self, request: RoutingRequest, now: float, prefix: dict[str, tuple[int, int, int]]
    ) -> SchedulingContext:
        # A context per profile run, sharing the prompt's prefix matches.
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
        times: list[tuple[Plugin, float]],
    ) -> tuple[Candidate | None, list[dict[str, Any]], dict[str, float] | None]:
        """One profile over ``candidates``: the pick (None: all filtered); with ``explain``
        each candidate's filter results and scores; the session-affinity scores (None: the
        profile has no session-affinity scorer). Each plugin's run is appended to ``times`` (one
        clock read per plugin: each starts where the one before ended). Scores outside
        [0, 1] are clamped."""
        clock = self.clock
        begun = clock()
        notes: dict[str, dict[str, Any]] = {}
        if explain:
            notes = {c.id: {"engine": c.id, "url": c.engine.url, "filters": {}} for c in candidates}
        for f in profile.filters:
            kept = f.filter(ctx, candidates)
            if explain:
                ids = {c.id for c in kept}
                for c in candidates:
                    notes[c.id]["filters"][f.name] = c.id in ids
            candidates = kept
            ended = clock()
            times.append((f, ended - begun))
            begun = ended
        if not candidates:
            return None, list(notes.values()), None
        totals = {c.id: 0.0 for c in candidates}
        affinity: dict[str, float] | None = None
        for ws in profile.scorers:
            scorer = ws.scorer
            scores = scorer.score(ctx, candidates)
            if scorer.SESSION_AFFINITY:
                affinity = scores
            for c in candidates:
                value = scores.get(c.id, 0.0)
                if not 0.0 <= value <= 1.0:
                    value = 0.0 if value < 0.0 else 1.0  # (NaN: 1.0 is as good as any)
                totals[c.id] += ws.weight * value
                if explain:
                    notes[c.id].setdefault("scores", {})[scorer.name] = {
                        "score": round(value, 4),
                        "weight": ws.weight,
                    }
            ended = clock()
            times.append((scorer, ended - begun))
            begun = ended
        picker = profile.picker
        chosen = picker.pick(ctx, [(c, totals[c.id]) for c in candidates])
        times.append((picker, clock() - begun))
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
        for plugin in self._current_plugins():
            plugin.served(engine_id, now)


__all__ = ["Decision", "Profile", "Scheduler", "SchedulingConfig", "WeightedScorer"]
