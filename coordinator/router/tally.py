"""What a scheduler decided, counted for metrics. Sans-I/O.

:class:`SchedulerTally` holds plain, monotonically growing numbers that
:class:`~fleet.coordinator.statemetrics.FleetStateCollector` turns into Prometheus families
when ``/metrics`` is scraped, so the scheduling runner pays a few additions per request and
no lock or label lookup.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

#: Upper bounds (seconds) of the scheduling-duration histogram: picking is meant to take well
#: under a millisecond, and the seeds promise 5-10 ms.
DURATION_BUCKETS_S = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
)

#: Upper bounds (seconds) of each plugin's duration histogram: a plugin takes microseconds.
PLUGIN_BUCKETS_S = (
    0.000001,
    0.0000025,
    0.000005,
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.005,
)

#: Decisions whose plugin runs wait before they are folded into the histograms.
FOLD_EVERY = 256


class TimedPlugin(Protocol):
    """What the tally needs of a plugin (:class:`~.plugins.Plugin`)."""

    name: str
    KIND: ClassVar[str]
    TYPE: ClassVar[str]


#: Decision outcomes: an engine was picked, or every candidate was filtered out.
OUTCOMES = ("picked", "no_engine")

#: Session affinity of requests that carry a session id: the picked engine is the session's
#: engine (hit), the session's engine was a candidate and another won (miss), or no candidate
#: was the session's engine (none: a new session, or its engine is gone).
AFFINITY = ("hit", "miss", "none")


@dataclass
class PluginTime:
    """Time spent in one plugin instance, over every scheduling run: a histogram."""

    kind: str  # "filter", "scorer" or "picker"
    type: str
    seconds: float = 0.0
    calls: int = 0
    #: per bucket of :data:`PLUGIN_BUCKETS_S` (not cumulative), then one for larger values
    counts: list[int] = field(default_factory=lambda: [0] * (len(PLUGIN_BUCKETS_S) + 1))

    def cumulative_buckets(self) -> list[tuple[str, int]]:
        """(``le``, cumulative count) pairs, as Prometheus wants them."""
        return _cumulative(PLUGIN_BUCKETS_S, self.counts)


@dataclass
class SchedulerTally:
    """Counts of a :class:`~.scheduler.Scheduler`'s decisions (explain runs are not counted)."""

    decisions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    #: per bucket of :data:`DURATION_BUCKETS_S` (not cumulative), then one for larger values
    duration_counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS_S) + 1))
    duration_sum_s: float = 0.0
    _plugins: dict[str, PluginTime] = field(default_factory=dict)  # by plugin (instance) name
    #: plugin runs not yet folded into ``_plugins`` (:meth:`plugin_runs`)
    _runs: list[Sequence[tuple[TimedPlugin, float]]] = field(default_factory=list)
    affinity: dict[str, int] = field(default_factory=lambda: dict.fromkeys(AFFINITY, 0))
    prompt_blocks: int = 0  # full blocks of prompts scheduled with their tokens known
    matched_blocks: int = 0  # of those, blocks the picked engine held (its cached prefix)

    def decided(self, outcome: str, seconds: float) -> None:
        """Count one decision that took ``seconds``."""
        self.decisions[outcome] += 1
        self.duration_counts[bisect.bisect_left(DURATION_BUCKETS_S, seconds)] += 1
        self.duration_sum_s += seconds

    @property
    def plugins(self) -> dict[str, PluginTime]:
        """Time spent per plugin (instance) name, every run so far included."""
        self._fold()
        return self._plugins

    def plugin_runs(self, runs: Sequence[tuple[TimedPlugin, float]]) -> None:
        """Add one decision's plugin runs (each plugin and its seconds). Kept as they are and
        folded into :attr:`plugins` when it is read or :data:`FOLD_EVERY` decisions wait: a
        decision pays one append, not a histogram update per plugin."""
        self._runs.append(runs)
        if len(self._runs) >= FOLD_EVERY:
            self._fold()

    def _fold(self) -> None:
        runs, self._runs = self._runs, []
        entries, bounds = self._plugins, PLUGIN_BUCKETS_S
        for decision in runs:
            for plugin, seconds in decision:  # inline: about 8 runs a decision
                entry = entries.get(plugin.name)
                if entry is None:
                    entry = entries[plugin.name] = PluginTime(plugin.KIND, plugin.TYPE)
                entry.seconds += seconds
                entry.calls += 1
                entry.counts[bisect.bisect_left(bounds, seconds)] += 1

    def prefix(self, matched: int, total: int) -> None:
        """Count a prompt of ``total`` full blocks, ``matched`` of them cached where it went."""
        self.prompt_blocks += total
        self.matched_blocks += matched

    def session(self, outcome: str) -> None:
        """Count one request with a session id by its affinity ``outcome`` (:data:`AFFINITY`)."""
        self.affinity[outcome] += 1

    def cumulative_buckets(self) -> list[tuple[str, int]]:
        """The duration histogram as Prometheus wants it: (``le``, cumulative count) pairs."""
        return _cumulative(DURATION_BUCKETS_S, self.duration_counts)


def _cumulative(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, int]]:
    out, running = [], 0
    for bound, n in zip((*map(str, bounds), "+Inf"), counts, strict=True):
        running += n
        out.append((bound, running))
    return out


__all__ = [
    "AFFINITY",
    "DURATION_BUCKETS_S",
    "OUTCOMES",
    "PLUGIN_BUCKETS_S",
    "PluginTime",
    "SchedulerTally",
]
