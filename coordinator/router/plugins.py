"""What every scheduling plugin is built on: the plugin and its checked parameters, the three
kinds (:class:`Filter`, :class:`Scorer`, :class:`Picker`), the candidate engines and the
per-request context they read.

The plugin types themselves live one module per kind (:mod:`.filters`, :mod:`.scorers`,
:mod:`.pickers`, :mod:`.pd` for profile handlers and deciders, :mod:`.elsewhere` for llm-d types
whose job Fleet does another way), registered by name in :mod:`.registry`.

Scorers whose data is missing (metrics never scraped, or older than the staleness limit) give
0.5 to every candidate, so they neither help nor hurt it.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
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
    # engine id -> (matched blocks, total blocks, block size): filled by the prefix scorer
    prefix: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    # requests an engine holds before it is full (the coordinator's --engine-slots)
    slots_per_engine: int = 64

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
    """A named plugin of one type. What it reads beyond the engines and in-flight counts it
    declares: ``NEEDS_TOKENS`` (the prompt's token ids, so the coordinator tokenizes it) and
    ``USES_METRICS`` (the engines' scraped ``/metrics``, so the coordinator scrapes them)."""

    TYPE: ClassVar[str] = ""
    KIND: ClassVar[str] = ""  # filter, scorer, picker, handler
    PARAMS: ClassVar[tuple[str, ...]] = ()
    NEEDS_TOKENS: ClassVar[bool] = False
    USES_METRICS: ClassVar[bool] = False

    def __init__(self, name: str, params: Params) -> None:
        self.name = name
        # What the loader logs once: accepted names Fleet ignores or maps (deprecated
        # parameters, jobs Fleet does another way).
        self.notes: list[str] = []

    def served(self, engine_id: str, now: float) -> None:
        """The request went to ``engine_id`` (plugins that count traffic override this)."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.TYPE}


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


# -- the kinds ------------------------------------------------------------------------------


class Filter(Plugin):
    """Narrows the candidates: :meth:`filter` takes them and returns those kept (in order);
    a filter judging each engine alone overrides :meth:`keep` instead."""

    KIND = "filter"

    def filter(self, ctx: SchedulingContext, candidates: list[Candidate]) -> list[Candidate]:
        return [c for c in candidates if self.keep(ctx, c)]

    def keep(self, ctx: SchedulingContext, c: Candidate) -> bool:
        raise NotImplementedError


class Scorer(Plugin):
    """Scores candidates in [0, 1] (the scheduler clamps what falls outside)."""

    KIND = "scorer"
    #: its scores say which engine holds the request's session (counted as affinity hits)
    SESSION_AFFINITY: ClassVar[bool] = False

    def score(self, ctx: SchedulingContext, candidates: Sequence[Candidate]) -> dict[str, float]:
        raise NotImplementedError


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


__all__ = [
    "NEUTRAL",
    "ROLE_LABEL",
    "Candidate",
    "DecayingCounts",
    "Filter",
    "Params",
    "Picker",
    "Plugin",
    "SchedulingContext",
    "Scorer",
    "SessionStore",
    "rendezvous",
]
