"""Reads and writes on a plain trio socket for the proxy's hot path, with fewer system calls
and task switches than :class:`trio.SocketStream`.

Why: ``SocketStream.receive_some`` tries to receive first and waits for readability only when
that fails, so where the peer has not answered yet (an engine just sent its request, a client
between two requests) every receive costs a failed ``recv``; and after each successful call it
yields to the scheduler once more. Here a caller that expects to wait says so
(``wait_first``): readability first, then one read, the wait being the checkpoint. A write
that goes out whole checks for cancellation without yielding; one that would block waits for
writability.

Errors are the OS's (``OSError``: reset, broken pipe, a closed socket), not trio's stream
errors; end of file is ``b""``.
"""

from __future__ import annotations

import os

import trio

READ_BYTES = 65536


def read_ready(sock: trio.socket.SocketType) -> bytes | None:
    """Up to :data:`READ_BYTES` already received (``b""`` at end of file), or None where
    none came yet; never waits (and is no checkpoint)."""
    try:
        return os.read(sock.fileno(), READ_BYTES)
    except BlockingIOError:
        return None


async def receive(sock: trio.socket.SocketType, *, wait_first: bool) -> bytes:
    """Up to :data:`READ_BYTES` from ``sock`` (``b""`` at end of file), waiting for them.

    ``wait_first``: wait for readability before reading (the caller expects to wait); else
    read at once when bytes are there (a cancellation still raises ``Cancelled``).
    """
    if not wait_first:
        await trio.lowlevel.checkpoint_if_cancelled()
        data = read_ready(sock)
        if data is not None:
            return data
    fd = sock.fileno()
    while True:
        await trio.lowlevel.wait_readable(sock)
        try:
            return os.read(fd, READ_BYTES)
        except BlockingIOError:  # woken without bytes after all: wait again
            pass


def send_ready(sock: trio.socket.SocketType, data: bytes | bytearray | memoryview) -> int:
    """Write what of ``data`` fits in ``sock``'s buffer now: the bytes written (0 where it is
    full); never waits (and is no checkpoint)."""
    try:
        return os.write(sock.fileno(), data)
    except BlockingIOError:
        return 0


_unyielded = 0  # sends since the last one that yielded to the scheduler (fairness)
YIELD_EVERY = 64


async def send_all(sock: trio.socket.SocketType, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data`` to ``sock``, waiting for writability where the buffer is full.

    A write that goes out whole does not yield, except one in :data:`YIELD_EVERY` (across the
    process): a relay whose engine always has bytes ready cannot keep the others waiting.
    """
    global _unyielded
    _unyielded += 1
    if _unyielded >= YIELD_EVERY:
        _unyielded = 0
        await trio.lowlevel.checkpoint()
    else:
        await trio.lowlevel.checkpoint_if_cancelled()
    fd = sock.fileno()
    view = memoryview(data)
    while view:
        try:
            sent = os.write(fd, view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        view = view[sent:]


__all__ = ["READ_BYTES", "YIELD_EVERY", "read_ready", "receive", "send_all", "send_ready"]
