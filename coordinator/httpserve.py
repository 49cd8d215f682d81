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

This is hypercorn's ``worker_serve`` (trio) with the accept loop and the connections apart;
it uses hypercorn's connection, lifespan and worker-context classes, hence the pinned minor
version in pyproject.toml.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from typing import Any, cast

import trio
from hypercorn.config import Config
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import repr_socket_addr, wrap_app

from fleet.protocol import http11

log = logging.getLogger("fleet.coordinator.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[Any], Awaitable[None]]
ASGIApp = Any  # an ASGI application (hypercorn's own type is a union of event types)


class Draining:
    """An ASGI wrapper that counts the HTTP requests in flight and, once ``closing``, adds
    ``Connection: close`` to the response of every request that starts."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.in_flight = 0
        self.closing = False
        self._idle = trio.Event()
        self._idle.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        self.in_flight += 1
        if self.in_flight == 1:
            self._idle = trio.Event()
        try:
            # Until a drain, the app's own send: nothing added on the hot path. A request that
            # started before the drain keeps its connection; the next request on it is told.
            await self.app(scope, receive, send_closing if self.closing else send)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def idle(self) -> None:
        """Wait until no request is in flight."""
        await self._idle.wait()


async def serve(
    app: ASGIApp,
    config: Config,
    *,
    drain: trio.Event,
    drain_s: float,
    grace_s: float = 1.0,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``config.bind`` until ``drain`` is set, then drain (see the module
    docstring) and return. Cancellation stops it at once."""
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
                for sock in sockets.insecure_sockets:
                    sock.listen(config.backlog)
                    listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
                    binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
                handler = partial(
                    TCPServer, wrapped, config, context, ConnectionState(lifespan_state.copy())
                )
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


__all__ = ["Draining", "serve"]
