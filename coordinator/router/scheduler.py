"""One scheduling profile run over the candidate engines: filter, score, pick.

Sans-I/O: the caller passes the engines, the in-flight counts and the time. With ``explain``
the decision carries every candidate's filter results and per-scorer scores (what
``fleet route explain`` prints and ``POST /api/v1/route/explain`` returns).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..kvindex import KVIndex
from ..registry import EngineView
from .enginestats import EngineStatsStore
from .plugins import (
    Candidate,
    Filter,
    Picker,
    Plugin,
    PrefixCacheScorer,
    SchedulingContext,
    Scorer,
    SessionAffinityScorer,
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
        return any(isinstance(w.scorer, PrefixCacheScorer) for w in self.scorers)

    @property
    def uses_metrics(self) -> bool:
        return any(w.scorer.USES_METRICS for w in self.scorers) or any(
            f.TYPE == "healthy-filter" for f in self.filters
        )


@dataclass
class Decision:
    """What the pipeline chose, and (with ``explain``) why."""

    engine: EngineView | None
    prefix_tokens: int = 0
    scheduling_ms: float = 0.0
    candidates: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "selected": self.engine.id if self.engine else None,
            "prefix_tokens": self.prefix_tokens,
            "scheduling_ms": round(self.scheduling_ms, 4),
            "candidates": self.candidates,
        }


class Scheduler:
    """Runs a profile for each request.

    Args:
        profile: the scheduling profile.
        index: the global KV-block index.
        stats: the engines' scraped metrics.
        sessions: session → engine memory (session affinity).
        rng: tie-breaking randomness.
        clock: for ``scheduling_ms`` and each plugin's time.

    ``tally`` counts every decision but explain runs (:mod:`.tally`, exported as metrics).
    """

    def __init__(
        self,
        profile: Profile,
        index: KVIndex,
        *,
        stats: EngineStatsStore | None = None,
        sessions: SessionStore | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.profile = profile
        self.index = index
        self.stats = stats or EngineStatsStore()
        self.sessions = sessions or SessionStore()
        self.rng = rng or random.Random()
        self.clock = clock
        self.tally = SchedulerTally()

    def schedule(
        self,
        request: RoutingRequest,
        engines: Sequence[EngineView],
        inflight: Callable[[str], int],
        now: float,
        *,
        explain: bool = False,
    ) -> Decision:
        """Choose an engine for ``request`` among ``engines`` (None if every one is filtered)."""
        clock, tally = self.clock, self.tally
        started = clock()
        ctx = SchedulingContext(request, self.index, self.sessions, now, self.rng)
        candidates = [Candidate(e, inflight(e.id), self.stats.get(e.id, now)) for e in engines]
        notes: dict[str, dict[str, Any]] = {}
        if explain:
            notes = {c.id: {"engine": c.id, "url": c.engine.url, "filters": {}} for c in candidates}
        for f in self.profile.filters:
            begun = clock()
            ctx.candidates = candidates
            kept = []
            for c in candidates:
                ok = f.keep(ctx, c)
                if explain:
                    notes[c.id]["filters"][f.name] = ok
                if ok:
                    kept.append(c)
            candidates = kept
            tally.plugin(f.name, "filter", f.TYPE, clock() - begun)
        if not candidates:
            elapsed = clock() - started
            if not explain:
                tally.decided("no_engine", elapsed)
            return Decision(None, 0, elapsed * 1000, list(notes.values()))
        totals = {c.id: 0.0 for c in candidates}
        affinity: dict[str, float] | None = None
        for ws in self.profile.scorers:
            begun = clock()
            scores = ws.scorer.score(ctx, candidates)
            tally.plugin(ws.scorer.name, "scorer", ws.scorer.TYPE, clock() - begun)
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
        begun = clock()
        picker = self.profile.picker
        chosen = picker.pick(ctx, [(c, totals[c.id]) for c in candidates])
        tally.plugin(picker.name, "picker", picker.TYPE, clock() - begun)
        matched, total_blocks, block_size = ctx.prefix_match([chosen])[chosen.id]
        elapsed = clock() - started
        elapsed_ms = elapsed * 1000
        if not explain:
            tally.decided("picked", elapsed)
            if total_blocks:
                tally.prefix(matched, total_blocks)
            if affinity is not None and request.session_id:
                if affinity.get(chosen.id, 0.0) > 0:
                    tally.session("hit")
                else:
                    tally.session("miss" if any(affinity.values()) else "none")
        if explain:
            for c in candidates:
                note = notes[c.id]
                note["total"] = round(totals[c.id], 4)
                n, total, size = ctx.prefix_match([c])[c.id]
                note["prefix"] = {"blocks": n, "of": total, "tokens": n * size}
                note["inflight"] = c.inflight
                note["selected"] = c.id == chosen.id
        return Decision(chosen.engine, matched * block_size, elapsed_ms, list(notes.values()))

    def served(self, request: RoutingRequest, engine_id: str, now: float) -> None:
        """Record that ``engine_id`` took the request (session affinity, traffic counts)."""
        session = request.session_id
        if session:
            self.sessions.remember(session, engine_id, now)
        for plugin in self.profile.plugins():
            plugin.served(engine_id, now)


__all__ = ["Decision", "Profile", "Scheduler", "WeightedScorer"]
