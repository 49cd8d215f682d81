"""The coordinator's front HTTP/1.1 server on trio sockets, for the inference routes; its
HTTP is :mod:`.http1server` (requests parsed by httptools).

Why: in issue 16's prototypes (one core, same run) quart-trio + hypercorn served 429 proxied
requests/s at 2.33 ms of CPU each, a bare h11 server on trio 4,345/s at 0.23 ms (both with
the h11 engine client). This server reads each request line first
(:func:`.frontpolicy.classify`): a ``POST`` to an inference route it serves itself through its
handler (:mod:`.fastroutes`); any other request goes, with its connection and the bytes already
read, to hypercorn's own connection handler, which serves the quart app as before. So admin,
health, metrics and every other route keep hypercorn's and quart's behaviour exactly, with no
ASGI code of ours; the price is that a connection handed over stays with hypercorn until it
closes (its later inference requests are served by quart, through the same
:mod:`.fastroutes` code).

One connection, one task, and on a plain socket its reader (:mod:`.fastreader`), which reads
it throughout (over TLS this task reads, and a watcher task per request). Per request: read
the head (``keep_alive_s`` for its first byte, ``header_timeout_s`` from there for the rest,
at most ``max_header_bytes``: 408 or 431 otherwise, 400 for a malformed one), then call the
handler with an :class:`.Exchange` (body, response, the client leaving noticed:
:mod:`.fastexchange`). A connection
serves its next request only when both sides finished their message
(:func:`.frontpolicy.keep_open`); one closed with its request's body unread lingers a moment
(half-closed, reading) so its client can read the answer.

Draining (:class:`Drain`, :class:`.httpserve.Draining`): once ``closing``, every response says
``Connection: close``; an idle connection waits for its client (who may be sending just then)
until ``terminated``.

Errors: a connection's own failure (reset, broken pipe, a bug) ends that connection only; a
bug is logged with its traceback.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Protocol

import trio

from .errors import error_body
from .fastexchange import READ_BYTES, Exchange, FrontRequest, server_headers
from .fastreader import Reader
from .frontpolicy import FrontLimits, classify, head_deadline, keep_open
from .frontwaits import HeadWaits
from .http1server import BadRequest, RequestHead, ServerConnection

log = logging.getLogger("fleet.coordinator.http")

LINGER_S = 1.0  # after answering a request whose body was not read: let the client read it


class Drain(Protocol):
    """What a drain tells the front server (:class:`.httpserve.Draining` implements it)."""

    closing: bool  # every response from now on says Connection: close
    terminated: bool  # idle connections close

    def enter(self) -> None:
        """A request started."""

    def leave(self) -> None:
        """A request ended."""

    def idle(self, scope: trio.CancelScope) -> AbstractContextManager[None]:
        """While inside, ``scope`` (an idle connection's wait) is cancelled by a termination."""

    def when_terminated(self, end_idle: Callable[[], None]) -> None:
        """Call ``end_idle`` at the termination (it ends the plain connections' idle waits)."""


Handler = Callable[[FrontRequest, "Exchange"], Awaitable[None]]
HandOver = Callable[[trio.abc.HalfCloseableStream], Awaitable[None]]


#: A client connection: plain, or TLS (``--tls-cert``) over a socket.
ClientStream = trio.SocketStream | trio.SSLStream[trio.SocketStream]


class PrefixedStream(trio.abc.HalfCloseableStream):
    """A socket stream whose first bytes were already read: ``prefix`` comes first.

    hypercorn reads its connection's addresses from ``socket``, as on a plain SocketStream.
    """

    def __init__(self, stream: ClientStream, prefix: bytes) -> None:
        self.stream = stream
        transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        self.socket = transport.socket
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            size = max_bytes or len(self._prefix)
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            return data
        return bytes(await self.stream.receive_some(max_bytes))  # a copy only over TLS

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if isinstance(self.stream, trio.SSLStream):
            raise trio.ClosedResourceError("TLS cannot half-close")
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


class PrefixedTLSStream(PrefixedStream):
    """A :class:`PrefixedStream` over TLS, as hypercorn looks at one: its handshake (done
    already), the protocol ALPN chose and the transport's socket, so its scope says https."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream], prefix: bytes) -> None:
        super().__init__(stream, prefix)
        self.tls = stream
        self.transport_stream = stream.transport_stream

    async def do_handshake(self) -> None:
        await self.tls.do_handshake()

    def selected_alpn_protocol(self) -> str | None:
        chosen: str | None = self.tls.selected_alpn_protocol()
        return chosen


class FrontServer:
    """Serves connections (:meth:`serve_connection`, for ``trio.serve_listeners``).

    Args:
        handler: serves the requests to ``paths``.
        paths: the request paths (bytes, no query) ``handler`` serves; ``POST`` only.
        limits: sizes and timeouts.
        drain: the drain state (closing, terminated, requests in flight).
        hand_over: serves a connection's other requests (hypercorn), from its next byte.
    """

    def __init__(
        self,
        handler: Handler,
        paths: frozenset[bytes],
        limits: FrontLimits,
        drain: Drain,
        hand_over: HandOver,
    ) -> None:
        self.handler = handler
        self.paths = paths
        self.limits = limits
        self.drain = drain
        self.hand_over = hand_over
        # Plain connections waiting for a request's head (no cancel scope per wait)
        self.head_waits = HeadWaits(limits, drain)
        drain.when_terminated(self.head_waits.end_idle)

    async def serve_connection(self, stream: ClientStream) -> None:
        """Serve one connection until it closes; never raises (but Cancelled)."""
        conn = _Connection(self, stream)
        try:
            await conn.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client left, or reset the connection
        except Exception:
            log.exception("front connection failed")
        finally:
            if conn.linger:
                with trio.move_on_after(LINGER_S):
                    await _linger(stream)
            await trio.aclose_forcefully(stream)


async def _linger(stream: ClientStream) -> None:
    """Half-close, then read until the client closes: closing with its unread bytes in our
    receive buffer would reset the connection before it read our answer (not over TLS, which
    cannot half-close)."""
    if isinstance(stream, trio.SSLStream):
        return
    try:
        await stream.send_eof()
        while await stream.receive_some(READ_BYTES):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


class _Connection:
    def __init__(self, server: FrontServer, stream: ClientStream) -> None:
        self.server = server
        self.limits = server.limits
        self.stream = stream
        self.conn = ServerConnection(self.limits.max_header_bytes)
        self.last_active = trio.current_time()
        self.linger = False
        # A plain connection is read by its Reader, written through sockio; TLS as a stream.
        self.sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        self.reader: Reader | None = None
        self.scope: trio.CancelScope | None = None  # plain: the connection's, reader and all
        self.until = math.inf  # plain: when the wait for a request's head under way ends
        self.idle = False  # plain: that wait has no byte of a request yet

    async def run(self) -> None:
        rest = None
        if self.sock is None:  # TLS: read here, and by a watcher per request
            rest = await self._serve()
        else:
            async with trio.open_nursery() as nursery:
                self.reader = Reader(self.conn, self.sock, self.limits.max_header_bytes)
                self.scope = nursery.cancel_scope
                self.server.head_waits.start()
                nursery.start_soon(self.reader.run)
                try:
                    rest = await self._serve()
                finally:
                    self.reader.stop()  # no byte more, even where it was woken already
                    nursery.cancel_scope.cancel()
        if rest is not None:
            await self.server.hand_over(
                PrefixedStream(self.stream, rest)
                if self.sock is not None
                else PrefixedTLSStream(self.stream, rest)  # type: ignore[arg-type]
            )

    async def _serve(self) -> bytes | None:
        """Serve requests until the connection closes (None) or one goes to hypercorn (the
        bytes read of it)."""
        drain, conn = self.server.drain, self.conn
        while True:
            started = await self._route()
            if started is None:
                return None
            if started < 0:
                return conn.buffered()
            request = await self._head(started)
            if request is None:
                return None
            drain.enter()
            try:
                exchange = Exchange(conn, self.stream, self.limits, request, closing=drain.closing)
                await self._handle(exchange)
            finally:
                drain.leave()
            their_done = conn.request_complete and conn.keep_alive
            if not exchange.responded:
                return None  # the client left (or the handler did not answer): close
            if not keep_open(
                our_done=conn.response_complete and conn.keep_alive,
                their_done=their_done,
                peer_closed=exchange.peer_gone or conn.closed,
                closing=drain.terminated,
            ):
                self.linger = not their_done and not exchange.peer_gone
                return None
            conn.start_next()
            self.last_active = trio.current_time()

    async def _handle(self, exchange: Exchange) -> None:
        """Run the handler, cancelled when the client leaves (once the body is read).

        A plain connection's client that left cancels the whole connection (its reader saw
        the end; nothing more is read or written): no scope of its own per request.
        """
        handler = self.server.handler
        if self.reader is not None:
            exchange.reader = self.reader
            exchange.cancel_scope = self.scope
            try:
                await handler(exchange.request, exchange)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                exchange.peer_gone = True  # a write failed: the client left
            finally:
                self.reader.watch(None)
            return
        async with trio.open_nursery() as nursery:
            exchange.nursery = nursery
            exchange.cancel_scope = nursery.cancel_scope
            try:
                await handler(exchange.request, exchange)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                exchange.peer_gone = True  # a write failed: the client left
            nursery.cancel_scope.cancel()  # the watcher

    async def _route(self) -> float | None:
        """Read until the next request's line says who serves it: when its first byte came
        (for the front server), -1 (for hypercorn), or None (closed, or timed out)."""
        started: float | None = None
        while True:
            buffered, closed = self.conn.buffered(), self.conn.closed
            if buffered and started is None:
                started = trio.current_time()
            route = classify(buffered, self.server.paths, self.limits.max_header_bytes)
            if route == "hypercorn":
                return -1.0
            if route == "front":
                assert started is not None
                return started
            if closed or (started is None and self.server.drain.terminated):
                return None
            deadline = head_deadline(
                last_active=self.last_active, started=started, limits=self.limits
            )
            if self.reader is not None:
                ended = await self._wait(deadline, idle=started is None)
            else:  # TLS
                with trio.move_on_at(deadline) as scope:
                    if started is None:
                        with self.server.drain.idle(scope):
                            await self._more()
                    else:
                        await self._more()
                ended = scope.cancelled_caught
            if ended:
                if started is not None and deadline <= trio.current_time():
                    await self._refuse(408, "The request's headers took too long to arrive.")
                return None

    async def _wait(self, until: float, *, idle: bool) -> bool:
        """Plain: wait for the client's next bytes (or its end) until ``until`` (the server's
        sweep ends the wait then; its drain's termination ends an ``idle`` one,
        :mod:`.frontwaits`): whether the wait was ended so."""
        assert self.reader is not None
        waiting = self.server.head_waits.waiting
        self.until, self.idle = until, idle
        waiting.add(self)
        try:
            await self.reader.more()
        finally:
            waiting.discard(self)
        ended, self.reader.expired = self.reader.expired, False
        return ended

    def end_wait(self) -> None:
        """End the wait in :meth:`_wait`."""
        assert self.reader is not None
        self.reader.expire()

    async def _more(self) -> None:
        """Wait for the client's next bytes (or its end) in ``self.conn``."""
        if self.reader is not None:
            await self.reader.more()
        else:
            self.conn.feed(bytes(await self.stream.receive_some(READ_BYTES)))

    async def _head(self, started: float) -> RequestHead | None:
        """The request's line and headers, or None (answered with an error, or closed)."""
        deadline = started + self.limits.header_timeout_s
        while True:
            try:
                request = self.conn.next_request()
            except BadRequest as exc:
                await self._refuse(exc.status, str(exc))
                return None
            if request is not None:
                return request
            if self.conn.closed:
                return None
            with trio.move_on_at(deadline) as scope:
                await self._more()
            if scope.cancelled_caught:
                await self._refuse(408, "The request's headers took too long to arrive.")
                return None

    async def _refuse(self, status: int, message: str) -> None:
        """Answer a request that cannot be read, then close."""
        if self.conn.responded:
            return
        body = error_body(message, code=status)
        headers = [(b"content-type", b"application/json"), *server_headers()]
        await self.stream.send_all(self.conn.respond(status, headers, body, close=True))


__all__ = ["Drain", "FrontServer", "Handler", "PrefixedStream"]
