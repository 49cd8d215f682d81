"""The one task that reads a plain front connection (:mod:`.fastserve`), for its whole life.

Why: a watcher task per request (started once the body is read, cancelled when the response
ends) cost a task, a nursery, a cancellation and two ``epoll_ctl`` calls per request, and the
connection task then waited for the next request itself. Here one task per connection waits
for readability (:mod:`.sockio`), feeds what comes to the connection's HTTP state
(:mod:`.http1server`) and wakes the connection task where it waits for bytes
(:meth:`Reader.more`); the next request's bytes wake the wait that was set during the previous
response.

End of file (or a reset) while a handler works with its body read (:meth:`Reader.watch`)
cancels the handler; a pipelined next request is kept, and reading pauses while more than
``limit`` bytes wait unparsed (until the connection task wants more). A TLS connection keeps
the watcher per request (:meth:`.Exchange._watch`): its stream reads in its own task only.
"""

from __future__ import annotations

from typing import Protocol

import trio

from . import sockio
from .http1server import ServerConnection


class Watched(Protocol):
    """A request whose handler the client's leaving cancels."""

    def client_left(self) -> None:
        """The client closed its side (or reset the connection): cancel the handler."""


class Reader:
    """Reads a plain connection into ``conn`` (:meth:`run`, in its own task).

    Args:
        conn: the connection's HTTP state (fed here only).
        sock: the connection's socket.
        limit: unparsed bytes past which reading pauses.
    """

    def __init__(self, conn: ServerConnection, sock: trio.socket.SocketType, limit: int) -> None:
        self.conn = conn
        self.sock = sock
        self.limit = limit
        self.done = False  # end of file fed (or the reader stopped)
        self.stopped = False  # set by stop(): read no more
        self._watched: Watched | None = None
        self._wake: trio.Event | None = None  # the connection task waits for bytes
        self.expired = False  # the connection task's wait was ended (:meth:`expire`)
        self._resume: trio.Event | None = None  # paused over the limit

    async def run(self) -> None:
        """Read until end of file (or a reset); never raises but Cancelled."""
        conn = self.conn
        try:
            while True:
                if conn.pending > self.limit:
                    self._resume = trio.Event()
                    await self._resume.wait()  # then read once, whatever is buffered
                await trio.lowlevel.wait_readable(self.sock)
                if self.stopped:  # woken, but the connection is handed over or closing
                    return
                try:
                    data = sockio.read_ready(self.sock)
                except OSError:
                    data = b""  # reset: as good as closed
                if data is None:
                    continue
                conn.feed(data)
                if not data:
                    self.done = True
                    if self._watched is not None:
                        self._watched.client_left()
                    return
                self._wake_up()
        finally:
            self.done = True
            self._wake_up()

    async def more(self) -> None:
        """Wait until more bytes (or the end) came into ``conn``; at once if it ended."""
        if self.done:
            await trio.lowlevel.checkpoint()
            return
        if self._resume is not None:
            self._resume.set()
            self._resume = None
        self._wake = wake = trio.Event()
        await wake.wait()

    def expire(self) -> None:
        """End the connection task's wait in :meth:`more` (its deadline passed): it returns,
        :attr:`expired` set."""
        self.expired = True
        self._wake_up()

    def stop(self) -> None:
        """Read no more (from now, before the reader task is cancelled: it may have been
        woken already): the connection's next bytes are someone else's."""
        self.stopped = True

    def watch(self, request: Watched | None) -> None:
        """From now, end of file cancels ``request``'s handler (None: no request); one whose
        client has left already is cancelled at once."""
        self._watched = request
        if request is not None and self.conn.closed:
            request.client_left()

    def _wake_up(self) -> None:
        if self._wake is not None:
            self._wake.set()
            self._wake = None


__all__ = ["Reader", "Watched"]
