"""Restart the coordinator without refusing a connection: ``fleet coordinator --hot-restart``.

A small parent process binds the HTTP socket and runs the coordinator as its child, handing it
the listening socket (``--http-fd``). The socket outlives every child: while one starts, new
connections wait in the socket's accept queue (4096) instead of being refused.

- **SIGHUP** (a graceful restart, e.g. to pick up a new configuration or code): the running
  child is told to drain (SIGTERM: it stops accepting, releases the agent link, finishes the
  requests in flight), and a new child starts at once; it binds the agent link once the old one
  let go of it, the agents register with it, and it takes the queued connections. No request is
  refused or cut.
- **The child dies** (a crash, SIGKILL, out of memory): a new one starts at once. The requests
  the dead child was serving are lost with their connections; no other request is. A child that
  dies within ``stable_s`` of its start is started again after an exponential backoff (0.5 s,
  ×2, up to ``max_backoff_s``). The first child dying before it served (a bad flag, a port in
  use) ends the parent with its exit status.
- **SIGTERM or SIGINT**: the child drains and the parent exits after it; a second one is
  passed on (the child then stops at once).

The parent holds no state and imports nothing of the coordinator. Parent and child share a
socket pair: the child writes one byte when it serves, and drains if the pair reads end of file
(its parent is gone: a child never outlives the parent that holds its socket).
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import trio

log = logging.getLogger("fleet.coordinator.hotrestart")

READY = b"R"


def listen(host: str, port: int, backlog: int = 4096) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port), inheritable."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


@dataclass(eq=False)
class _Child:
    proc: trio.Process
    control: trio.socket.SocketType
    started_at: float
    ready: trio.Event = field(default_factory=trio.Event)
    retiring: bool = False


class HotRestart:
    """The parent process's loop (see the module docstring).

    Args:
        child_argv: the child's command line, given the listening socket's and the control
            socket's file descriptors.
        listener: the listening socket (:func:`listen`).
        stable_s: a child that lived this long was not crash-looping.
        max_backoff_s: the longest wait before starting a crash-looping child again.
    """

    def __init__(
        self,
        child_argv: Callable[[int, int], Sequence[str]],
        listener: socket.socket,
        *,
        stable_s: float = 10.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.child_argv = child_argv
        self.listener = listener
        self.stable_s = stable_s
        self.max_backoff_s = max_backoff_s
        self.current: _Child | None = None
        self.children: set[_Child] = set()
        self.generation = 0
        self.restarts = 0
        self._stopping = False
        self._served = False  # some child has served: a later death is restarted
        self._crashes = 0  # deaths in a row, each within stable_s of its start
        self._exit_status = 0
        self._all_gone = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> int:
        """Run children until a signal stops them (see the module docstring); the exit
        status."""
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._signals, signals)
                status = await self.supervise(task_status=task_status)
                nursery.cancel_scope.cancel()
        return status

    async def supervise(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> int:
        """Run children until :meth:`stop`, taking no signals (the caller does); the exit
        status."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._spawn()
            task_status.started()
            await self._all_gone.wait()
            nursery.cancel_scope.cancel()
        return self._exit_status

    def restart(self) -> None:
        """A graceful restart (what SIGHUP does)."""
        if self._stopping or self.current is None:
            return
        log.warning("restarting the coordinator gracefully (generation %d)", self.generation + 1)
        self._retire(self.current)
        self._nursery.start_soon(self._spawn)

    def stop(self) -> None:
        """Drain the children, then end (what SIGTERM does; a second call passes it on)."""
        if self._stopping:
            for child in self.children:
                _signal(child.proc, signal.SIGTERM)
            return
        self._stopping = True
        for child in list(self.children):
            self._retire(child)
        if not self.children:
            self._all_gone.set()

    async def _signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                self.restart()
            else:
                log.warning("%s: stopping", signal.Signals(signum).name)
                self.stop()

    def _retire(self, child: _Child) -> None:
        child.retiring = True
        if self.current is child:
            self.current = None
        _signal(child.proc, signal.SIGTERM)

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        self.generation += 1
        argv = list(self.child_argv(self.listener.fileno(), theirs.fileno()))
        try:
            proc = await trio.lowlevel.open_process(
                argv, pass_fds=(self.listener.fileno(), theirs.fileno()), stdin=subprocess.DEVNULL
            )
        finally:
            theirs.close()
        child = _Child(proc, trio.socket.from_stdlib_socket(ours), trio.current_time())
        self.current = child
        self.children.add(child)
        log.info("coordinator generation %d: pid %d", self.generation, proc.pid)
        self._nursery.start_soon(self._watch, child)

    async def _watch(self, child: _Child) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._ready, child)
            status = await child.proc.wait()
            nursery.cancel_scope.cancel()
        child.control.close()
        self.children.discard(child)
        lived = trio.current_time() - child.started_at
        if child.retiring:
            log.info("coordinator pid %d stopped (status %d)", child.proc.pid, status)
            if self._stopping:
                self._exit_status = self._exit_status or max(status, 0)
        elif not self._served:
            log.error("the coordinator exited with status %d before it served", status)
            self._exit_status = status if status > 0 else 1
            self._stopping = True
            for other in list(self.children):
                self._retire(other)
        else:
            self._crashes = self._crashes + 1 if lived < self.stable_s else 1
            wait = restart_wait_s(self._crashes, self.max_backoff_s)
            log.error(
                "coordinator pid %d died (status %d) after %.1f s; starting another in %.1f s",
                child.proc.pid,
                status,
                lived,
                wait,
            )
            if self.current is child:
                self.current = None
            await trio.sleep(wait)
            if not self._stopping and self.current is None:
                self.restarts += 1
                await self._spawn()
        if self._stopping and not self.children:
            self._all_gone.set()

    async def _ready(self, child: _Child) -> None:
        if await child.control.recv(1) == READY:
            self._served = True
            child.ready.set()
            log.info("coordinator pid %d serves", child.proc.pid)
        await trio.sleep_forever()


def restart_wait_s(crashes: int, max_backoff_s: float) -> float:
    """How long to wait before starting a child again after ``crashes`` deaths in a row, each
    soon after its start: none after the first, then 0.5 s, doubling, up to ``max_backoff_s``."""
    if crashes <= 1:
        return 0.0
    return float(min(0.5 * 2 ** (crashes - 2), max_backoff_s))


def _signal(proc: trio.Process, signum: int) -> None:
    if proc.returncode is None:
        proc.send_signal(signum)


async def watch_parent(fd: int, on_gone: Callable[[], None]) -> None:
    """The child's side of the control pair: say it serves, then call ``on_gone`` when the
    parent is gone (the pair reads end of file)."""
    control = trio.socket.socket(fileno=fd)
    with control:
        await control.send(READY)
        while await control.recv(64):
            pass
    log.warning("the hot-restart parent is gone: draining")
    on_gone()


__all__ = ["HotRestart", "listen", "restart_wait_s", "watch_parent"]
