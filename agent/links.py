"""The agent's links to its coordinators: one ZMQ DEALER socket per coordinator endpoint.

:class:`CoordinatorLinks` owns the sockets; each link has a receiver task in a nursery the
caller gives. :meth:`~CoordinatorLinks.open` connects a socket at once (usable for sending on
return) and starts its receiver. :meth:`~CoordinatorLinks.close` forgets a link at once (nothing
more is sent on it) and cancels its receiver, which closes the socket as it exits, so a socket
is never closed under a task still reading it. Leaving the ``with`` block closes the sockets of
the links still open: leave it only once the receivers' nursery is done, so that messages sent
while the agent stops (its engines' last heartbeats) still go out.

With ``curve`` keys every socket is a CURVE client of the coordinator's key, and a handshake
that fails (the coordinator refuses this agent's key, or it is not the coordinator the keys are
for) is reported through ``refused``: libzmq retries silently otherwise.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType

import trio
import zmq

from fleet.protocol.curve import HANDSHAKE_FAILED, ClientKeys, HandshakeFailure, connect_curve
from fleet.protocol.curve import handshake_failure as parse_failure
from fleet.protocol.zmqio import open_socket, recv_batch

log = logging.getLogger(__name__)
REFUSED_LOG_EVERY_S = 10.0  # at most one line per link this often; every failure is counted

Receive = Callable[[zmq.Socket[bytes]], Awaitable[None]]
Refused = Callable[[str, HandshakeFailure], None]


@dataclass
class _Link:
    endpoint: str
    sock: zmq.Socket[bytes]
    stack: contextlib.ExitStack
    monitor: zmq.Socket[bytes] | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class CoordinatorLinks:
    """DEALER sockets to coordinators, keyed by endpoint, and their receivers.

    Args:
        ctx: the ZMQ context sockets are made in.
        routing_id: this node's ZMQ routing id (the same on every link).
        receive: reads one socket until cancelled (the agent's dispatcher).
        curve: this agent's CURVE keys; None: plaintext links.
        refused: called with the endpoint for each failed CURVE handshake (also logged, at
            most once per ``REFUSED_LOG_EVERY_S`` per link).
    """

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        *,
        routing_id: bytes,
        receive: Receive,
        curve: ClientKeys | None = None,
        refused: Refused = lambda endpoint, failure: None,
    ) -> None:
        self._ctx = ctx
        self._routing_id = routing_id
        self._receive = receive
        self._curve = curve
        self._refused = refused
        self._links: dict[str, _Link] = {}
        self._exited = False

    def __enter__(self) -> CoordinatorLinks:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exited = True
        links, self._links = self._links, {}
        for link in links.values():
            link.stack.close()

    def endpoints(self) -> frozenset[str]:
        """Endpoints of the links open now."""
        return frozenset(self._links)

    @property
    def socks(self) -> list[zmq.Socket[bytes]]:
        """The open links' sockets, in the order they were opened."""
        return [link.sock for link in self._links.values()]

    def open(self, endpoint: str, nursery: trio.Nursery) -> zmq.Socket[bytes]:
        """Connect a socket to ``endpoint`` and read it in a task in ``nursery``; the link
        already open there, if any, is returned as is.

        Raises:
            RuntimeError: the ``with`` block was left.
            zmq.ZMQError: ZMQ rejects the endpoint.
        """
        if self._exited:
            raise RuntimeError("coordinator links are closed")
        if endpoint in self._links:
            return self._links[endpoint].sock
        stack = contextlib.ExitStack()
        try:
            sock = stack.enter_context(open_socket(self._ctx, zmq.DEALER))
            sock.setsockopt(zmq.ROUTING_ID, self._routing_id)
            if endpoint.startswith("tcp://["):
                sock.setsockopt(zmq.IPV6, 1)
            monitor = None
            if self._curve is not None:
                connect_curve(sock, self._curve)
                monitor = sock.get_monitor_socket(HANDSHAKE_FAILED)
                stack.callback(_close_monitor, sock, monitor)  # runs before the socket closes
            sock.connect(endpoint)
        except BaseException:
            stack.close()
            raise
        link = _Link(endpoint, sock, stack, monitor)
        self._links[endpoint] = link
        nursery.start_soon(self._serve, link, name=f"coordinator link {endpoint}")
        return sock

    def close(self, endpoint: str) -> None:
        """Stop using the link to ``endpoint``; its socket closes once its receiver has
        stopped. No link there: nothing happens."""
        link = self._links.pop(endpoint, None)
        if link is not None:
            link.scope.cancel()

    async def _serve(self, link: _Link) -> None:
        try:
            with link.scope:
                if link.monitor is None:
                    await self._receive(link.sock)
                else:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._watch, link, link.monitor)
                        await self._receive(link.sock)
        finally:
            if link.scope.cancel_called:  # closed by close(); otherwise __exit__ closes it
                link.stack.close()

    async def _watch(self, link: _Link, monitor: zmq.Socket[bytes]) -> None:
        logged_at, quiet = -float("inf"), 0
        while True:
            for frames in await recv_batch(monitor):
                failure = parse_failure(frames)
                if failure is None:
                    continue
                self._refused(link.endpoint, failure)
                if trio.current_time() - logged_at < REFUSED_LOG_EVERY_S:
                    quiet += 1
                    continue
                logged_at, more = trio.current_time(), f" ({quiet} more since)" if quiet else ""
                quiet = 0
                log.warning("CURVE handshake with the coordinator at %s failed: %s%s",
                            link.endpoint, failure.why, more)  # fmt: skip


def _close_monitor(sock: zmq.Socket[bytes], monitor: zmq.Socket[bytes]) -> None:
    if not sock.closed:
        sock.disable_monitor()
    trio.lowlevel.notify_closing(monitor.getsockopt(zmq.FD))  # type: ignore[arg-type]
    monitor.close(linger=0)


__all__ = ["CoordinatorLinks"]
