"""The plain front connections' waits for a request's head, ended at their deadlines by one
sweep for the whole server instead of a cancel scope per wait (:mod:`.fastserve`).

Why: a trio cancel scope with a deadline costs about 9 us to set up and tear down here, and
every kept-alive connection waited for its next request in one: on every request's path (its
exit is the first thing the next request pays). A wait here is an entry in a set; a sweep every
:func:`.frontpolicy.sweep_every` ends the waits whose deadline passed (within a tenth of the
shorter head timeout of it), and the drain's termination ends the idle ones at once.
"""

from __future__ import annotations

import logging
from typing import Protocol

from .frontpolicy import FrontLimits, sweep_every, wait_ends
from .loopsweep import LoopSweep

log = logging.getLogger("fleet.coordinator.http")


class HeadWait(Protocol):
    """A connection waiting for a request's head."""

    until: float  # when its wait ends
    idle: bool  # no byte of a request came yet

    def end_wait(self) -> None:
        """End the wait now."""


class Terminated(Protocol):
    terminated: bool  # the server's drain ended: idle connections close


class HeadWaits:
    """Every plain connection's wait for a request's head, and their sweep.

    Args:
        limits: the head timeouts (how often to sweep).
        drain: whether the server's drain ended (idle waits end then).
    """

    def __init__(self, limits: FrontLimits, drain: Terminated) -> None:
        self.waiting: set[HeadWait] = set()
        self._drain = drain
        every = sweep_every(limits)
        self._sweep = LoopSweep("fleet front head waits", lambda: every, self.end_due)

    def start(self) -> None:
        """Start the sweep, once per event loop."""
        self._sweep.start()

    def end_due(self, now: float) -> None:
        """End the waits that end at ``now`` (:func:`.frontpolicy.wait_ends`)."""
        terminated = self._drain.terminated
        for wait in [
            w
            for w in self.waiting
            if wait_ends(until=w.until, idle=w.idle, now=now, terminated=terminated)
        ]:
            wait.end_wait()

    def end_idle(self) -> None:
        """End the idle waits (the drain ended)."""
        for wait in [w for w in self.waiting if w.idle]:
            wait.end_wait()


__all__ = ["HeadWait", "HeadWaits"]
