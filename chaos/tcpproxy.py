"""A fault-injecting TCP proxy: put it on a link (an agent's link to the coordinator, say) and
break that link on demand.

Modes: ``pass`` (bytes flow), ``delay`` (each chunk waits ``delay_s`` before it goes on: a slow
network), ``partition`` (every connection is cut, new ones are closed as soon as they are
accepted: the peers see resets and refused handshakes, as across a broken network). ``heal``
goes back to ``pass``. This kernel has no ``tc netem``; a userspace proxy needs no privileges.
"""

from __future__ import annotations

import math

import trio


class FaultProxy:
    """Forwards connections accepted on a local port to ``target_host:target_port``.

    Resource handling: :meth:`run` owns the listener and every connection pair; cancelling it
    closes them all.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.mode = "pass"
        self.delay_s = 0.0
        self.port = 0
        self.connections = 0  # accepted in all
        self.cut = 0  # connections cut by a partition
        self._pairs: set[trio.CancelScope] = set()

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; ``started()`` gives the port."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._serve, listeners, handler_nursery=nursery)

    def partition(self) -> None:
        """Cut every connection; refuse new ones until :meth:`heal`."""
        self.mode = "partition"
        self.cut += len(self._pairs)
        for scope in list(self._pairs):
            scope.cancel()

    def delay(self, seconds: float) -> None:
        """Hold each chunk ``seconds`` before it goes on."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"delay must be a finite number >= 0, got {seconds!r}")
        self.mode, self.delay_s = "delay", seconds

    def heal(self) -> None:
        self.mode, self.delay_s = "pass", 0.0

    async def _serve(self, client: trio.SocketStream) -> None:
        self.connections += 1
        async with client:
            if self.mode == "partition":
                return
            try:
                upstream = await trio.open_tcp_stream(*self.target)
            except OSError:
                return
            async with upstream:
                with trio.CancelScope() as scope:
                    self._pairs.add(scope)
                    try:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope)
                            nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope)
                    finally:
                        self._pairs.discard(scope)

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, both: trio.CancelScope
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                if self.delay_s:
                    await trio.sleep(self.delay_s)
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        both.cancel()  # one side ended: end the pair


__all__ = ["FaultProxy"]
