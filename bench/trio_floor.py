"""The floor of a Python hop: a minimal HTTP/1.1 proxy on trio, for ``proxy-overhead``.

Not Fleet and not for use: no validation, no admission, no tokenizing or routing logic (round
robin), no timeouts, no error answers. A connection's requests are read by their
``Content-Length``; each goes whole to the next engine over a kept-alive connection, and the
answer comes back as it arrives (by its ``Content-Length``, or chunked until the zero-size
chunk). What it adds over going direct is what any Python proxy on trio pays for the hop itself
on the machine: Fleet's added latency beyond it is Fleet's own work.

    python -m fleet.bench.trio_floor PORT HOST:PORT [HOST:PORT ...]
"""

from __future__ import annotations

import functools
import itertools
import sys
from collections.abc import Iterator

import trio

READ_BYTES = 65536
_LAST_CHUNK = b"0\r\n\r\n"


def framing(buffer: bytes) -> tuple[int, int | None] | None:
    """How the message starting ``buffer`` is framed, once its head is there: (head length,
    body length; None: chunked), or None while its head is incomplete."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    length = 0
    for line in buffer[:end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            return end + 4, None
    return end + 4, length


class Engines:
    """Round robin over the engines, each with a stack of idle kept-alive connections."""

    def __init__(self, addresses: list[tuple[str, int]]) -> None:
        self._idle: dict[tuple[str, int], list[trio.SocketStream]] = {a: [] for a in addresses}
        self._next: Iterator[tuple[str, int]] = itertools.cycle(addresses)

    async def relay(self, request: bytes, client: trio.SocketStream) -> None:
        """Send ``request`` to the next engine and its answer to ``client`` as it comes."""
        address = next(self._next)
        idle = self._idle[address]
        engine = idle.pop() if idle else await trio.open_tcp_stream(*address)
        await engine.send_all(request)
        buffer = b""
        frame = None
        while frame is None:
            buffer += await _receive(engine)
            frame = framing(buffer)
        head, length = frame
        if length is not None:
            while len(buffer) < head + length:
                buffer += await _receive(engine)
            await client.send_all(buffer[: head + length])
        else:
            await client.send_all(buffer)
            while not buffer.endswith(_LAST_CHUNK):
                buffer = await _receive(engine)
                await client.send_all(buffer)
        idle.append(engine)


async def _receive(stream: trio.SocketStream) -> bytes:
    data = await stream.receive_some(READ_BYTES)
    if not data:
        raise trio.BrokenResourceError("closed mid-message")
    return bytes(data)


async def serve(engines: Engines, client: trio.SocketStream) -> None:
    """Relay a client connection's requests until it closes."""
    buffer = b""
    try:
        while True:
            frame = framing(buffer)
            if frame is None or frame[1] is None or len(buffer) < frame[0] + frame[1]:
                data = await client.receive_some(READ_BYTES)
                if not data:
                    return
                buffer += data
                continue
            size = frame[0] + frame[1]
            request, buffer = buffer[:size], buffer[size:]
            await engines.relay(request, client)
    except (trio.BrokenResourceError, OSError, ValueError):  # ValueError: a bad length
        pass


def main(argv: list[str]) -> None:
    """Serve on ``argv[0]`` (a port on 127.0.0.1) in front of the ``host:port`` engines."""
    port, addresses = int(argv[0]), argv[1:]
    engines = Engines([(h, int(p)) for h, _, p in (a.rpartition(":") for a in addresses)])

    async def handler(client: trio.SocketStream) -> None:
        await serve(engines, client)

    trio.run(functools.partial(trio.serve_tcp, handler, port, host="127.0.0.1"))


if __name__ == "__main__":
    main(sys.argv[1:])
