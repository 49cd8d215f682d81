"""The agent's links to its coordinators: one ZMQ DEALER socket per coordinator endpoint.

:class:`CoordinatorLinks` owns the sockets; each link has a receiver task in a nursery the
caller gives. :meth:`~CoordinatorLinks.open` connects a socket at once (usable for sending on
return) and starts its receiver. :meth:`~CoordinatorLinks.close` forgets a link at once (nothing
more is sent on it) and cancels its receiver, which closes the socket as it exits, so a socket
is never closed under a task still reading it. Leaving the ``with`` block closes the sockets of
the links still open: leave it only once the receivers' nursery is done, so that messages sent
while the agent stops (its engines' last heartbeats) still go out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType

import trio
import zmq

from fleet.protocol.zmqio import open_socket

Receive = Callable[[zmq.Socket[bytes]], Awaitable[None]]


@dataclass
class _Link:
    sock: zmq.Socket[bytes]
    stack: contextlib.ExitStack
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class CoordinatorLinks:
    """DEALER sockets to coordinators, keyed by endpoint, and their receivers.

    Args:
        ctx: the ZMQ context sockets are made in.
        routing_id: this node's ZMQ routing id (the same on every link).
        receive: reads one socket until cancelled (the agent's dispatcher).
    """

    def __init__(
        self, ctx: zmq.Context[zmq.Socket[bytes]], *, routing_id: bytes, receive: Receive
    ) -> None:
        self._ctx = ctx
        self._routing_id = routing_id
        self._receive = receive
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
            sock.connect(endpoint)
        except BaseException:
            stack.close()
            raise
        link = _Link(sock, stack)
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
                await self._receive(link.sock)
        finally:
            if link.scope.cancel_called:  # closed by close(); otherwise __exit__ closes it
                link.stack.close()


__all__ = ["CoordinatorLinks"]
