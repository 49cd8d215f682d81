"""One connection to an engine (:class:`Connection`), a read from it (:func:`receive`) and the
response read over it (:class:`Response`), for :mod:`.engineclient`.

A response holds its connection and a slot of its client's pool until it is released: read to
its end (the connection goes back to the pool where the response allows reuse) or closed.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncGenerator
from typing import Protocol

import trio

from . import sockio
from .engineerrors import EngineBroken, EngineTimeout
from .http1client import BadResponse, ResponseParser


class Connection:
    """A socket to an engine and the parser of the response under way on it."""

    __slots__ = ("parser", "sock", "stream")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.sock = stream.socket  # read and written through :mod:`.sockio`
        self.parser = ResponseParser()  # the response under way

    def close(self) -> None:
        self.parser.detach()
        self.stream.socket.close()  # synchronous: no await needed to let go of it


class Home(Protocol):
    """Where a response's connection goes back to (an :class:`.EngineClient`)."""

    def put_back(self, conn: Connection, *, reuse: bool) -> None:
        """Take ``conn`` back (kept for the next request where ``reuse``, else closed) and
        free its slot."""


async def receive(
    conn: Connection, read_s: float, *, wait_first: bool, timed: bool = False
) -> bytes:
    """The next bytes from the engine (``b""``: it closed); ``wait_first``: none are expected
    yet (the request just went out). The read timeout ``read_s`` runs from here; a cancel scope
    is set up only where there is a wait (bytes already there need none), and not where the
    caller times the wait (``timed``).

    Raises:
        EngineTimeout: no byte within ``read_s``.
        EngineBroken: the connection broke.
    """
    sock = conn.sock
    if not wait_first:
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            data = sockio.read_ready(sock)
        except OSError as exc:
            raise EngineBroken(f"the connection broke: {exc}") from exc
        if data is not None:
            return data
    if timed:
        try:
            return await sockio.receive(sock, wait_first=True)
        except OSError as exc:
            raise EngineBroken(f"the connection broke: {exc}") from exc
    with trio.CancelScope(deadline=trio.current_time() + read_s) as scope:
        try:
            return await sockio.receive(sock, wait_first=True)
        except OSError as exc:
            raise EngineBroken(f"the connection broke: {exc}") from exc
    assert scope.cancelled_caught
    raise EngineTimeout("read", read_s)


class Response:
    """An engine's response with its head read. Read the body with :meth:`aiter_raw` to its
    end (the connection then goes back to the pool) or :meth:`close` it (the connection is
    closed); either releases its connection slot.

    Attributes:
        status: the HTTP status.
        headers: (name, value) pairs, names lower-case, in the engine's order.
    """

    __slots__ = ("_conn", "_home", "_read_s", "_released", "headers", "status")

    def __init__(
        self,
        home: Home,
        conn: Connection,
        read_s: float,
        status: int,
        headers: list[tuple[str, str]],
    ) -> None:
        self.status = status
        self.headers = headers
        self._home = home
        self._conn = conn
        self._read_s = read_s  # each wait for body bytes, unless the caller times it
        self._released = False

    async def aiter_raw(self) -> AsyncGenerator[bytes, None]:
        """The body's bytes as they arrive, one item per receive (every chunk decoded
        from what came, joined: a stream's events that arrived together are passed on
        together); at the end the connection is kept for the next request.

        Raises:
            EngineTimeout: no byte within the read timeout.
            EngineBroken: the connection broke or the body was malformed.
        """
        try:
            while (data := await self.next_piece()) is not None:
                # Whole before this piece went out: the end (asked after the yield, bytes
                # fed meanwhile, ready(), would make it skip a piece).
                complete = self._conn.parser.complete
                yield data
                if complete:
                    return
        finally:
            self.close()  # the connection is kept where the whole response came

    async def read_all(self) -> bytes:
        """The whole body (one call where it came with the head: no generator to step); the
        response is then released, as :meth:`close` does.

        Raises:
            EngineTimeout: no byte within the read timeout.
            EngineBroken: the connection broke or the body was malformed.
        """
        pieces: list[bytes] = []
        try:
            while (data := await self.next_piece()) is not None:
                pieces.append(data)
                if self._conn.parser.complete:
                    break
        finally:
            self.close()
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def next_piece(self, *, timed: bool = False) -> bytes | None:
        """The body's next bytes as they arrive (None: its end); :meth:`close` it after.
        ``timed``: the caller's own cancel scope bounds each wait (no read timer here).

        Raises:
            EngineTimeout: no byte within the read timeout.
            EngineBroken: the connection broke or the body was malformed.
        """
        if self._released:
            raise RuntimeError("the response is closed")
        return await self._next(timed)

    async def _next(self, timed: bool = False) -> bytes | None:
        """The body's next bytes (None: its end), receiving where none are decoded yet."""
        conn = self._conn
        parser = conn.parser
        while True:
            try:
                data = parser.body()
            except BadResponse as exc:
                raise EngineBroken(f"bad response body: {exc}") from exc
            if data is None or data:
                return data
            parser.feed(await receive(conn, self._read_s, wait_first=False, timed=timed))

    def buffered(self) -> bool:
        """Whether bytes of the body came with the head (its first piece needs no wait)."""
        return not self._released and self._conn.parser.buffered()

    def ready(self) -> bool:
        """Whether the body's next step (a piece, its end, or its error) needs no wait: what
        the socket holds now is taken into the parser first. Never waits (no checkpoint)."""
        if self._released:
            return False
        conn = self._conn
        parser = conn.parser
        if not (parser.buffered() or parser.complete or parser.closed):
            try:
                data = sockio.read_ready(conn.sock)
            except OSError:
                return False  # the next read reports it
            if data is not None:
                parser.feed(data)
        return parser.buffered() or parser.complete or parser.closed

    def abort(self) -> None:
        """End the body now: its connection is shut down, so a wait for its next bytes wakes
        to the connection's end (the body then reads as broken). :meth:`close` it after."""
        if not self._released:
            try:
                self._conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the engine

    def close(self) -> None:
        """Let go of the response; its connection is kept for the next request where the
        whole response came (its body taken or not), else closed. Idempotent."""
        self._release(reuse=self._conn.parser.complete)

    async def aclose(self) -> None:
        """:meth:`close`, for ``async`` callers."""
        self.close()

    def _release(self, *, reuse: bool) -> None:
        if self._released:
            return
        self._released = True
        self._home.put_back(self._conn, reuse=reuse and self._conn.parser.reusable)


__all__ = ["Connection", "Home", "Response", "receive"]
