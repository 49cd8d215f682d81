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
from collections.abc import Mapping
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
from .engineresponse import Connection, Response, receive
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


class _Stale(Exception):
    """The connection ended before any byte of a response arrived."""


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
        self._idle: IdleStack[Connection] = IdleStack(max_idle, idle_expiry_s)

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

    async def _connect(self) -> Connection:
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
        return Connection(stream)

    async def _exchange(self, conn: Connection, data: bytes, timed: bool) -> Response:
        """Send the request ``data`` on ``conn`` and read the response's head (``timed``: with
        no read timer); ``conn`` is closed on any failure.

        Raises:
            _Stale: the connection ended before any byte of a response.
        """
        parser = conn.parser
        read_s = self.timeouts.read_s
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
                        return Response(self, conn, read_s, parser.status, parser.headers)
                except BadResponse as exc:
                    raise EngineBroken(f"bad response head: {exc}") from exc
                try:
                    chunk = await receive(conn, read_s, wait_first=not got_bytes, timed=timed)
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

    def put_back(self, conn: Connection, *, reuse: bool) -> None:
        """Take back a released response's connection (kept on the idle stack where
        ``reuse``, else closed) and free its slot."""
        if reuse:
            conn.parser.detach()
            conn.parser = ResponseParser()
            to_close = self._idle.put(conn, trio.current_time())
        else:
            to_close = [conn]
        for c in to_close:
            c.close()
        self._slots.release()


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
