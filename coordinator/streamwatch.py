"""Started streams' waits for their engine's next chunk, timed by one watchdog for all of
them instead of a cancel scope per chunk. Sans-I/O: :class:`StreamWatches` says which waits
are overdue; :class:`.EngineCalls` runs the watchdog and ends them.

Why: a trio cancel scope with a deadline costs about 9 us to set up and tear down here (the
scope, its status, the deadline heap twice, through a generator context manager), and a
stream waited in one per chunk. A watched wait costs two attribute writes and a clock read; a
sweep every ``idle_s / TICKS`` finds the waits that began ``idle_s`` ago or more (so one is
ended between ``idle_s`` and ``idle_s * (1 + 1 / TICKS)`` after it began) and ends each by
shutting its engine connection down (:meth:`.Response.abort`): the wait wakes to the end of
the body, and the relay reports why. Only a wait on the engine counts: a stream held up
writing to a slow client is not waiting on its engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable

TICKS = 10  # sweeps per idle_s


class StreamWatch:
    """One stream's wait on its engine.

    Args:
        engine_id: the engine streaming.
        idle_s: a wait this long breaks the stream.
        abort: ends the wait under way at once (shuts the engine connection down).
    """

    __slots__ = ("abort", "engine_id", "idle_s", "since", "why")

    def __init__(self, engine_id: str, idle_s: float, abort: Callable[[], None]) -> None:
        self.engine_id = engine_id
        self.idle_s = idle_s
        self.abort = abort
        self.since: float | None = None  # when the wait under way began (None: no wait)
        self.why = ""  # why the stream was ended ("": it was not)

    def end(self, why: str) -> None:
        """Break the stream for ``why``, ending its wait (once)."""
        if not self.why:
            self.why = why
            self.abort()


class StreamWatches:
    """Every started stream's watch, by engine."""

    def __init__(self) -> None:
        self.by_engine: dict[str, set[StreamWatch]] = {}
        self.tick_s = math.inf  # how often to sweep: the shortest idle_s / TICKS seen

    def add(self, watch: StreamWatch) -> None:
        watches = self.by_engine.get(watch.engine_id)
        if watches is None:
            watches = self.by_engine[watch.engine_id] = set()
        watches.add(watch)
        self.tick_s = min(self.tick_s, watch.idle_s / TICKS)

    def remove(self, watch: StreamWatch) -> None:
        self.by_engine.get(watch.engine_id, set()).discard(watch)

    def overdue(self, now: float) -> list[StreamWatch]:
        """The waits under way that began ``idle_s`` or more before ``now``, not ended yet."""
        return [
            w
            for watches in self.by_engine.values()
            for w in watches
            if w.since is not None and now - w.since >= w.idle_s and not w.why
        ]

    def waiting(self, engine_id: str) -> list[StreamWatch]:
        """The streams of ``engine_id`` waiting on it now."""
        return [w for w in self.by_engine.get(engine_id, ()) if w.since is not None]

    def forget(self, keep: set[str]) -> None:
        """Drop the empty sets of engines that left (``keep``: the known ones)."""
        for engine_id in [e for e, w in self.by_engine.items() if e not in keep and not w]:
            del self.by_engine[engine_id]


__all__ = ["TICKS", "StreamWatch", "StreamWatches"]
