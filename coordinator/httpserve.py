"""Serve the HTTP API with hypercorn, and drain it without failing a request.

hypercorn's own graceful shutdown stops accepting and closes keep-alive connections at the same
moment; a client that reuses a keep-alive connection just then loses its request (measured:
16 of 224 requests under 16-way keep-alive load were reset or hung until the grace period ran
out). A drain here goes in steps instead:

1. stop accepting (this process's listening socket closes; a hot restart's parent keeps the
   socket, so new connections wait for the next coordinator instead of being refused);
2. every response from then on carries ``Connection: close``: a client finishes its request on
   its keep-alive connection, then opens a new one (to the successor);
3. a connection that stays idle is left for its client to close (httpx lets an idle connection
   go after 5 s) rather than closed under a request the client may be sending just then; once
   every connection is closed the server stops. After ``drain_s`` the connections left are
   closed, and requests still in flight get ``grace_s`` more before they are cut.

The front server (:mod:`.fastserve`) reads every connection first: it serves the inference
routes itself and hands any other request, with its connection, to hypercorn. Both follow the
steps above: the front server reads ``closing`` and ``terminated`` on :class:`Draining` and
counts its requests there.

This is hypercorn's ``worker_serve`` (trio) with the accept loop and the connections apart;
it uses hypercorn's connection, lifespan and worker-context classes, hence the pinned minor
version in pyproject.toml.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from functools import partial
from typing import Any, Protocol, cast

import trio
from hypercorn.config import Config
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import repr_socket_addr, wrap_app

from fleet.protocol import http11

from .fastexchange import Exchange, FrontRequest
from .fastserve import FrontServer
from .frontpolicy import FrontLimits

log = logging.getLogger("fleet.coordinator.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]
ASGIApp = Any  # an ASGI application (hypercorn's own type is a union of event types)


class Draining:
    """An ASGI wrapper that counts the HTTP requests in flight and, once ``closing``, adds
    ``Connection: close`` to the response of every request that starts. The front server
    (:mod:`.fastserve`) counts its own requests here too, and waits here while idle."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.in_flight = 0
        self.closing = False
        self.terminated = False  # idle connections are closed
        self._idle = trio.Event()
        self._idle.set()
        self._idle_waits: set[trio.CancelScope] = set()
        self._on_terminate: list[Callable[[], None]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        self.enter()
        try:
            # Until a drain, the app's own send: nothing added on the hot path. A request that
            # started before the drain keeps its connection; the next request on it is told.
            await self.app(scope, receive, send_closing if self.closing else send)
        finally:
            self.leave()

    def enter(self) -> None:
        """A request started."""
        self.in_flight += 1
        if self.in_flight == 1:
            self._idle = trio.Event()

    def leave(self) -> None:
        """A request ended."""
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    @contextmanager
    def idle(self, scope: trio.CancelScope) -> Iterator[None]:
        """While inside, :meth:`terminate` cancels ``scope`` (an idle connection's wait)."""
        self._idle_waits.add(scope)
        try:
            yield
        finally:
            self._idle_waits.discard(scope)

    def when_terminated(self, end_idle: Callable[[], None]) -> None:
        """Call ``end_idle`` at :meth:`terminate` (it ends idle waits kept elsewhere)."""
        self._on_terminate.append(end_idle)

    def terminate(self) -> None:
        """Close the idle connections (those waiting inside :meth:`idle` or told through
        :meth:`when_terminated`, and any later)."""
        self.terminated = True
        for scope in self._idle_waits:
            scope.cancel()
        for end_idle in self._on_terminate:
            end_idle()

    async def idle_wait(self) -> None:
        """Wait until no request is in flight."""
        await self._idle.wait()


async def serve(
    app: ASGIApp,
    config: Config,
    *,
    drain: trio.Event,
    drain_s: float,
    grace_s: float = 1.0,
    front: FrontRoutes | None = None,
    limits: FrontLimits | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``config.bind`` until ``drain`` is set, then drain (see the module
    docstring) and return. Cancellation stops it at once.

    Every connection is read by the front server (:mod:`.fastserve`): requests to
    ``front.paths`` are served by ``front`` under ``limits``; any other request goes, with its
    connection, to hypercorn and ``app``.
    """
    http11.install()  # never HTTP/2: hypercorn's can raise out of a connection and end serving
    config.set_statsd_logger_class(StatsdLogger)
    counted = Draining(app)
    wrapped = wrap_app(cast(Any, counted), config.wsgi_max_body_size, "asgi")
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)

    async def close_the_rest(connections: trio.Nursery) -> None:
        await trio.sleep(drain_s)  # unless every connection closed before (cancelled then)
        if counted.in_flight:
            log.warning("%d requests in flight after %s s: cut", counted.in_flight, drain_s)
        else:
            log.info("closing the idle connections left after %s s", drain_s)
        counted.terminate()  # the front server closes its idle connections
        await context.terminated.set()  # hypercorn closes idle connections
        connections.cancel_scope.deadline = trio.current_time() + grace_s

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as closer:
            async with trio.open_nursery() as connections:
                sockets = config.create_sockets()
                listeners = []
                binds = []
                tls = config.create_ssl_context() if config.ssl_enabled else None
                for sock in [*sockets.insecure_sockets, *sockets.secure_sockets]:
                    sock.listen(config.backlog)
                    listener: trio.abc.Listener[Any] = trio.SocketListener(
                        trio.socket.from_stdlib_socket(sock)
                    )
                    scheme = "http"
                    if tls is not None and sock in sockets.secure_sockets:
                        listener = trio.SSLListener(listener, tls, https_compatible=True)
                        scheme = "https"
                    listeners.append(listener)
                    binds.append(f"{scheme}://{repr_socket_addr(sock.family, sock.getsockname())}")
                state = ConnectionState(lifespan_state.copy())

                async def hand_over(stream: trio.abc.HalfCloseableStream) -> None:
                    await TCPServer(wrapped, config, context, state, cast(Any, stream)).run()

                server = FrontServer(
                    front if front is not None else _no_routes,
                    front.paths if front is not None else frozenset(),
                    limits or FrontLimits(keep_alive_s=config.keep_alive_timeout),
                    counted,
                    hand_over,
                )
                handler = server.serve_connection
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(
                        partial(
                            trio.serve_listeners, handler, listeners, handler_nursery=connections
                        )
                    )
                    for bind in binds:
                        log.info("Running on %s", bind)
                    task_status.started(binds)
                    await drain.wait()
                    # Before any await: a request starting while the listeners close must
                    # already be told Connection: close.
                    counted.closing = True
                    accepting.cancel_scope.cancel()
                for listener in listeners:
                    await listener.aclose()
                closer.start_soon(close_the_rest, connections)
            # Every connection is closed (its last response said Connection: close, or its
            # client let it go idle and closed it): nothing is left to close.
            closer.cancel_scope.cancel()
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


class FrontRoutes(Protocol):
    """The requests the front server serves itself: ``POST`` to ``paths``."""

    paths: frozenset[bytes]

    async def __call__(self, request: FrontRequest, exchange: Exchange) -> None:
        """Answer ``request`` through ``exchange``."""


async def _no_routes(request: FrontRequest, exchange: Exchange) -> None:
    raise AssertionError("no front routes, so no request for them")  # never called


__all__ = ["Draining", "FrontRoutes", "serve"]
