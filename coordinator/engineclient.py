"""A lean HTTP/1.1 client for the engines' inference API over trio sockets (its HTTP:
:mod:`.http1client`; reads and writes: :mod:`.sockio`).

Why not httpx here: profiled on the coordinator's request path, httpx + httpcore took about 38% of
its CPU (1.3 ms a request): the pool scans its connections on every request and response
(``_assign_requests_to_connections``) and polls each idle connection before reuse
(``is_readable``). An engine is one origin with one protocol, so its pool can be much simpler.
Control calls (health probes, metric scrapes) stay on httpx.

Connections. An :class:`EngineClient` serves one engine (``http://host:port``); its idle
connections form a last-in-first-out stack (:mod:`.idlestack`), and a semaphore bounds those in
use (a request waits up to the pool timeout for one). A connection goes back on the stack only
once the response body was read to its end and the response allows reuse (HTTP/1.1, no
``Connection: close``, framed by its length or chunked); a response closed part-way closes its
connection. Closing is a synchronous ``socket.close()``, so
releasing a response never awaits (safe in ``finally`` blocks and cancelled scopes).

Stale connections. An engine closes a connection that stays idle past its keep-alive timeout
(uvicorn's default: 5 s); idle connections older than ``idle_expiry_s`` are not reused. Where the
engine closed one anyway just before it was taken, the request fails on it with an EOF or a reset
before *any* byte of a response arrived. httpcore avoids this case by polling every idle socket
for readability before reusing it (the cost above), and does not retry. This client instead
sends on the connection and, when that exact case happens on a *reused* connection, sends the
request once more on a new connection. This is safe for POST when the engine closed the
connection while it was idle: it never read the request. An engine that read the request and then
closed the connection without a byte of answer would get it twice; such an engine is broken, and
the second try fails or answers as any retry would. A fresh connection is never retried.

Timeouts (:class:`Timeouts`): connect, write (sending the request), read (each wait for bytes,
so a stream may last as long as bytes keep coming) and pool (waiting for a connection slot);
each only where there is a wait (bytes already there, a write that fits, need no timer).

Errors: :mod:`.engineerrors`.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass

import h11
import trio

from . import sockio, wireheaders
from .engineerrors import (
    EngineBroken,
    EngineConnectError,
    EngineHTTPError,
    EngineTimeout,
    EngineURLError,
    parse_base_url,
)
from .http1client import BadResponse, ResponseParser, request_bytes
from .idlestack import IdleStack

# Set by the client itself; a caller's own are dropped.
OWN_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})


@dataclass(frozen=True)
class Timeouts:
    """Per-phase timeouts in seconds (``math.inf``: none)."""

    connect_s: float = 5.0
    read_s: float = math.inf
    write_s: float = math.inf
    pool_s: float = math.inf

    def __post_init__(self) -> None:
        for name in ("connect_s", "read_s", "write_s", "pool_s"):
            value = getattr(self, name)
            if not value > 0:  # also rejects NaN
                raise ValueError(f"Timeouts.{name} must be > 0 seconds (inf: none), got {value!r}")


class _Connection:
    __slots__ = ("parser", "sock", "stream")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.sock = stream.socket  # read and written through :mod:`.sockio`
        self.parser = ResponseParser()  # the response under way

    def close(self) -> None:
        self.parser.detach()
        self.stream.socket.close()  # synchronous: no await needed to let go of it


class _Stale(Exception):
    """The connection ended before any byte of a response arrived."""


class Response:
    """An engine's response with its head read. Read the body with :meth:`aiter_raw` to its
    end (the connection then goes back to the pool) or :meth:`close` it (the connection is
    closed); either releases its connection slot.

    Attributes:
        status: the HTTP status.
        headers: (name, value) pairs, names lower-case, in the engine's order.
    """

    def __init__(
        self, client: EngineClient, conn: _Connection, status: int, headers: list[tuple[str, str]]
    ) -> None:
        self.status = status
        self.headers = headers
        self._client = client
        self._conn = conn
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
            parser.feed(await self._client._receive(conn, wait_first=False, timed=timed))

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
        conn, client = self._conn, self._client
        if reuse and conn.parser.reusable:
            conn.parser.detach()
            conn.parser = ResponseParser()
            to_close = client._idle.put(conn, trio.current_time())
        else:
            to_close = [conn]
        for c in to_close:
            c.close()
        client._slots.release()


class EngineClient:
    """HTTP/1.1 to one engine, over a last-in-first-out pool of kept-alive connections.

    Resource handling: every response holds a connection slot until it is read to its end or
    closed; :meth:`aclose` closes the idle connections, and those in use close when released.

    Args:
        base_url: ``http://host:port`` of the engine.
        timeouts: per phase.
        max_connections: connections in use at once; more requests wait for the pool timeout.
        max_idle: kept-alive idle connections.
        idle_expiry_s: an idle connection older than this is closed, not reused (keep it under
            the engine's keep-alive timeout).

    Raises:
        EngineURLError: ``base_url`` is not ``http://host:port``.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeouts: Timeouts = Timeouts(),
        max_connections: int = 64,
        max_idle: int = 16,
        idle_expiry_s: float = 4.0,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections!r}")
        self.host, self.port = parse_base_url(base_url)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.authority = f"{host}:{self.port}".encode("ascii")
        self.timeouts = timeouts
        self.connections_opened = 0
        self._slots = trio.Semaphore(max_connections)
        self._max_connections = max_connections
        self._idle: IdleStack[_Connection] = IdleStack(max_idle, idle_expiry_s)

    @property
    def in_use(self) -> int:
        """Connection slots held by responses (and requests under way)."""
        return self._max_connections - self._slots.value

    @property
    def idle(self) -> int:
        """Idle kept-alive connections."""
        return len(self._idle)

    @property
    def waiting(self) -> int:
        """Requests waiting for a connection slot."""
        return self._slots.statistics().tasks_waiting

    async def request(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes = b"",
        *,
        timed: bool = False,
    ) -> Response:
        """Send a request and read its response's head; the body is left to read.

        Args:
            method: e.g. ``POST``.
            path: the request target, from ``/``.
            headers: extra request headers (``host``, ``content-length``, ``connection`` and
                ``transfer-encoding`` are the client's own and dropped).
            body: sent with ``content-length``.
            timed: the caller's own cancel scope bounds the wait for the head (no read timer
                here: one cancel scope less per request); the body's reads keep theirs.

        Raises:
            EngineConnectError: no connection could be opened.
            EngineTimeout: a phase (connect, write, read, pool) timed out.
            EngineBroken: the connection broke, or the engine's HTTP was malformed.
        """
        head = [(b"host", self.authority), (b"content-length", str(len(body)).encode())]
        head += [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in headers.items()
            if k.lower() not in OWN_HEADERS
        ]
        if not wireheaders.valid(head):  # h11 raises its usual error, naming the header
            h11.Request(method=method, target=path, headers=head)
        request = request_bytes(method.encode("ascii"), path.encode("ascii"), head) + body
        await self._acquire_slot()
        try:
            conn, expired = self._idle.take(trio.current_time())
            for c in expired:
                c.close()
            if conn is not None:
                try:
                    return await self._exchange(conn, request, timed)
                except _Stale:
                    pass  # closed by the engine while idle: it never saw the request (above)
            conn = await self._connect()
            try:
                return await self._exchange(conn, request, timed)
            except _Stale as exc:
                raise EngineBroken(f"the engine closed the connection: {exc}") from exc
        except BaseException:
            self._slots.release()
            raise

    async def aclose(self) -> None:
        """Close the idle connections; those in use close when their responses are released."""
        for conn in self._idle.close():
            conn.close()

    async def _acquire_slot(self) -> None:
        try:
            self._slots.acquire_nowait()
            return
        except trio.WouldBlock:
            pass
        limit = self.timeouts.pool_s
        with trio.CancelScope(deadline=trio.current_time() + limit) as scope:
            await self._slots.acquire()
        if scope.cancelled_caught:
            raise EngineTimeout("pool", limit)

    async def _connect(self) -> _Connection:
        limit = self.timeouts.connect_s
        with trio.CancelScope(deadline=trio.current_time() + limit) as scope:
            try:
                stream = await trio.open_tcp_stream(self.host, self.port)
            except OSError as exc:
                where = self.authority.decode()
                raise EngineConnectError(f"cannot connect to {where}: {exc}") from exc
        if scope.cancelled_caught:
            raise EngineTimeout("connect", limit)
        self.connections_opened += 1
        return _Connection(stream)

    async def _exchange(self, conn: _Connection, data: bytes, timed: bool) -> Response:
        """Send the request ``data`` on ``conn`` and read the response's head (``timed``: with
        no read timer); ``conn`` is closed on any failure.

        Raises:
            _Stale: the connection ended before any byte of a response.
        """
        parser = conn.parser
        try:
            await trio.lowlevel.checkpoint_if_cancelled()  # not sent when cancelled already
            try:
                sent = sockio.send_ready(conn.sock, data)
            except OSError as exc:
                raise _Stale(f"sending failed: {exc}") from exc
            if sent < len(data):  # the write timeout only where there is a wait
                limit = self.timeouts.write_s
                with trio.CancelScope(deadline=trio.current_time() + limit) as scope:
                    try:
                        await sockio.send_all(conn.sock, memoryview(data)[sent:])
                    except OSError as exc:
                        raise _Stale(f"sending failed: {exc}") from exc
                if scope.cancelled_caught:
                    raise EngineTimeout("write", limit)
            got_bytes = False
            while True:
                try:
                    if parser.head():
                        return Response(self, conn, parser.status, parser.headers)
                except BadResponse as exc:
                    raise EngineBroken(f"bad response head: {exc}") from exc
                try:
                    chunk = await self._receive(conn, wait_first=not got_bytes, timed=timed)
                except EngineBroken as exc:
                    if got_bytes:
                        raise
                    raise _Stale(str(exc)) from exc
                if not chunk and not got_bytes:
                    raise _Stale("closed without a response")
                got_bytes = True
                parser.feed(chunk)
        except BaseException:
            conn.close()
            raise

    async def _receive(self, conn: _Connection, *, wait_first: bool, timed: bool = False) -> bytes:
        """The next bytes from the engine (``b""``: it closed); ``wait_first``: none are
        expected yet (the request just went out). The read timeout runs from here; a cancel
        scope is set up only where there is a wait (bytes already there need none), and not
        where the caller times the wait (``timed``)."""
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
        limit = self.timeouts.read_s
        with trio.CancelScope(deadline=trio.current_time() + limit) as scope:
            try:
                return await sockio.receive(sock, wait_first=True)
            except OSError as exc:
                raise EngineBroken(f"the connection broke: {exc}") from exc
        assert scope.cancelled_caught
        raise EngineTimeout("read", limit)


__all__ = [
    "EngineBroken",
    "EngineClient",
    "EngineConnectError",
    "EngineHTTPError",
    "EngineTimeout",
    "EngineURLError",
    "Response",
    "Timeouts",
    "parse_base_url",
]
