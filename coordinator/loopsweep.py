"""A periodic sweep in the background of the event loop that first needs it: a trio system
task (it ends with the run, and never raises), started once per loop by :meth:`start`."""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

log = logging.getLogger(__name__)


class LoopSweep:
    """Calls ``sweep(now)`` every ``every()`` seconds, from the first :meth:`start` on.

    Args:
        name: the task's name (and the log's, when a sweep fails).
        every: the seconds until the next sweep (read before each wait).
        sweep: the work, given the trio time.
    """

    def __init__(
        self, name: str, every: Callable[[], float], sweep: Callable[[float], None]
    ) -> None:
        self.name = name
        self.every = every
        self.sweep = sweep
        self._loop: trio.lowlevel.TrioToken | None = None  # the event loop it runs in

    def start(self) -> None:
        """Start sweeping, once per event loop."""
        token = trio.lowlevel.current_trio_token()
        if self._loop is not token:
            self._loop = token
            trio.lowlevel.spawn_system_task(self._run, name=self.name)

    async def _run(self) -> None:
        while True:
            await trio.sleep(self.every())
            try:
                self.sweep(trio.current_time())
            except Exception:
                log.exception("%s: a sweep failed", self.name)


__all__ = ["LoopSweep"]
