"""The minimal proxy proxy-overhead measures as the floor of a Python hop: its framing, and
requests relayed over real loopback sockets (a whole answer and a chunked one)."""

from __future__ import annotations

import functools

import httpx
import trio

from fleet.bench.trio_floor import Engines, framing, serve


def test_framing_reads_the_head_then_the_body_length() -> None:
    assert framing(b"POST / HTTP/1.1\r\nHost: x\r\n") is None
    head = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"
    assert framing(head + b"ab") == (len(head), 5)
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert framing(chunked) == (len(chunked), None)
    assert framing(b"GET /health HTTP/1.1\r\n\r\n") == (24, 0)


async def _engine(stream: trio.SocketStream) -> None:
    """Answers each request: /stream chunked in two writes, anything else whole."""
    buffer = b""
    while True:
        while (frame := framing(buffer)) is None or len(buffer) < frame[0] + (frame[1] or 0):
            data = await stream.receive_some(65536)
            if not data:
                return
            buffer += data
        assert frame[1] is not None
        request, buffer = buffer[: frame[0] + frame[1]], buffer[frame[0] + frame[1] :]
        if request.startswith(b"POST /stream "):
            await stream.send_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            await stream.send_all(b"6\r\ndata: \r\n")
            await stream.send_all(b"2\r\nok\r\n0\r\n\r\n")
        else:
            body = b"echo:" + request[frame[0] :]
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            await stream.send_all(body)


async def test_requests_are_relayed_over_kept_alive_connections() -> None:
    async with trio.open_nursery() as nursery:
        (engine,) = await nursery.start(
            functools.partial(trio.serve_tcp, _engine, 0, host="127.0.0.1")
        )
        engines = Engines([("127.0.0.1", engine.socket.getsockname()[1])])
        (proxy,) = await nursery.start(
            functools.partial(
                trio.serve_tcp, functools.partial(serve, engines), 0, host="127.0.0.1"
            )
        )
        url = f"http://127.0.0.1:{proxy.socket.getsockname()[1]}"
        async with httpx.AsyncClient(base_url=url) as client:
            for i in range(3):
                answer = await client.post("/v1/completions", content=b"n%d" % i)
                assert answer.status_code == 200 and answer.content == b"echo:n%d" % i
            streamed = await client.post("/stream", content=b"{}")
            assert streamed.content == b"data: ok"
            bad = await trio.open_tcp_stream("127.0.0.1", proxy.socket.getsockname()[1])
            await bad.send_all(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n")
            assert await bad.receive_some() == b""  # that connection closed, the proxy lives on
            again = await client.post("/v1/completions", content=b"after")
            assert again.content == b"echo:after"
        assert len(engines._idle[("127.0.0.1", engine.socket.getsockname()[1])]) == 1  # reused
        nursery.cancel_scope.cancel()
