"""The front HTTP/1.1 server (fleet.coordinator.fastserve, frontpolicy): its decisions as plain
calls, then HTTP over real loopback sockets, byte by byte, against hypercorn's and uvicorn's
behaviour: keep-alive, pipelining, Connection: close, HTTP/1.0, 100-continue, malformed and
oversized requests, slow clients, clients that leave, the hand-over to hypercorn, and drain."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import trio
from hypercorn.config import Config

from fleet.coordinator.fastexchange import Exchange, FrontRequest
from fleet.coordinator.frontpolicy import (
    SWEEPS,
    FrontLimits,
    classify,
    head_deadline,
    keep_open,
    sweep_every,
    wait_ends,
)
from fleet.coordinator.httpserve import serve
from fleet.protocol.errors import ConfigError

PATHS = frozenset({b"/echo", b"/stream", b"/wait", b"/early", b"/held"})

# -- decisions ----------------------------------------------------------------------------------


def test_the_request_line_says_who_serves_it() -> None:
    def route(data: bytes) -> str | None:
        return classify(data, PATHS, max_line=64)

    assert route(b"POST /echo HTTP/1.1\r\nHost: x\r\n") == "front"
    assert route(b"POST /echo?x=1 HTTP/1.0\r\n") == "front"
    assert route(b"POST /echo HTTP/1.1\n") == "front"  # a bare LF ends a line too
    assert route(b"POST /ec") is None  # wait for the rest of the line
    assert route(b"POST /echo HTTP/1.1") is None
    assert route(b"") is None
    for other in (
        b"GET /echo HTTP/1.1\r\n",  # another method
        b"POST /admin HTTP/1.1\r\n",  # another path
        b"POST /echo/ HTTP/1.1\r\n",
        b"POST /echo HTTP/2.0\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # the HTTP/2 preface
        b"\r\nPOST /echo HTTP/1.1\r\n",  # hypercorn answers it as before
        b"X" * 64,  # a line longer than the limit: hypercorn refuses it
    ):
        assert route(other) == "hypercorn", other


def test_a_head_has_keep_alive_s_to_start_then_header_timeout_s_to_finish() -> None:
    limits = FrontLimits(keep_alive_s=75, header_timeout_s=10)
    assert head_deadline(last_active=100.0, started=None, limits=limits) == 175.0
    assert head_deadline(last_active=100.0, started=170.0, limits=limits) == 180.0


def test_a_wait_for_a_head_ends_at_its_deadline_or_when_idle_at_the_drain_end() -> None:
    assert not wait_ends(until=10.0, idle=True, now=9.99, terminated=False)
    assert wait_ends(until=10.0, idle=False, now=10.0, terminated=False)
    assert wait_ends(until=10.0, idle=True, now=1.0, terminated=True)
    assert not wait_ends(until=10.0, idle=False, now=1.0, terminated=True)  # a head under way
    assert sweep_every(FrontLimits(keep_alive_s=75, header_timeout_s=10)) == 10 / SWEEPS


def test_a_connection_is_kept_only_when_both_sides_are_done_and_not_draining() -> None:
    keep = {"our_done": True, "their_done": True, "peer_closed": False, "closing": False}
    assert keep_open(**keep)
    for key in keep:
        assert not keep_open(**{**keep, key: not keep[key]}), key


@pytest.mark.parametrize(
    ("field", "value"),
    [("keep_alive_s", 0), ("header_timeout_s", math.nan), ("body_timeout_s", -1),
     ("max_body_bytes", 0), ("max_header_bytes", 0)],
)  # fmt: skip
def test_bad_limits_are_rejected_naming_the_field(field: str, value: float) -> None:
    with pytest.raises(ConfigError) as err:
        FrontLimits(**{field: value})
    assert err.value.key == field


# -- a server over real sockets -----------------------------------------------------------------

LIMITS = FrontLimits(
    max_body_bytes=1024,
    body_timeout_s=0.5,
    keep_alive_s=5.0,
    header_timeout_s=0.3,
    max_header_bytes=2048,
)


class Routes:
    """The front routes: ``/echo`` answers its body, ``/stream`` streams two chunks (the second
    once ``release`` is set), ``/wait`` never answers, ``/early`` answers without reading."""

    paths = PATHS

    def __init__(self) -> None:
        self.release = trio.Event()
        self.started = trio.Event()
        self.cleaned = trio.Event()  # a /stream or /wait handler ended, however

    async def __call__(self, request: FrontRequest, exchange: Exchange) -> None:
        if request.path == "/early":
            await exchange.respond(401, {"content-type": "text/plain"}, b"no")
            return
        try:
            body = await exchange.read_body()
        except Exception as exc:  # the errors a handler answers (413, 408, 400)
            status = getattr(exc, "status", 500)
            await exchange.respond(status, {"content-type": "text/plain"}, str(exc).encode())
            return
        if request.path == "/echo":
            await exchange.respond(200, {"content-type": "text/plain", "x-front": "1"}, body)
            return
        try:
            self.started.set()
            if request.path == "/wait":
                await trio.sleep_forever()
            if request.path == "/held":  # the head waits for the first chunk; the last ends it
                await exchange.start(200, {"content-type": "text/event-stream"}, hold=True)
                await exchange.send(b"data: 1\n\n")
                await self.release.wait()
                await exchange.end(b"data: 2\n\n")
                return
            await exchange.start(200, {"content-type": "text/event-stream"})
            await exchange.send(b"data: 1\n\n")
            await self.release.wait()
            await exchange.send(b"data: 2\n\n")
            await exchange.end()
        finally:
            self.cleaned.set()


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """What hypercorn serves: ``asgi <method> <path> <body>``."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    text = f"asgi {scope['method']} {scope['path']} ".encode() + body
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": text})


async def start(
    nursery: trio.Nursery,
    routes: Routes,
    drain: trio.Event | None = None,
    drain_s: float = 5,
    limits: FrontLimits = LIMITS,
) -> tuple[str, int]:
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None

    async def run(*, task_status: trio.TaskStatus[list[str]]) -> None:
        await serve(
            asgi_app,
            config,
            drain=drain if drain is not None else trio.Event(),
            drain_s=drain_s,
            front=routes,
            limits=limits,
            task_status=task_status,
        )

    url = (await nursery.start(run))[0]
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


class Client:
    """A raw connection that reads HTTP/1.1 responses exactly as they come."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    @classmethod
    async def open(cls, addr: tuple[str, int]) -> Client:
        return cls(await trio.open_tcp_stream(*addr))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _more(self) -> None:
        with trio.fail_after(5):  # a safety bound: answers take milliseconds
            data = await self.stream.receive_some(65536)
        if not data:
            raise EOFError
        self.buf += data

    async def _until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            await self._more()
        out, self.buf = self.buf.split(marker, 1)
        return out

    async def head(self) -> tuple[int, dict[str, str]]:
        lines = (await self._until(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        status, headers = await self.head()
        return status, headers, await self.body(headers)

    async def body(self, headers: dict[str, str]) -> bytes:
        """The body of the response whose ``headers`` were read."""
        if "content-length" in headers:
            size = int(headers["content-length"])
            while len(self.buf) < size:
                await self._more()
            body, self.buf = self.buf[:size], self.buf[size:]
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int(await self._until(b"\r\n"), 16):
                while len(self.buf) < size + 2:
                    await self._more()
                body, self.buf = body + self.buf[:size], self.buf[size + 2 :]
            await self._until(b"\r\n")
        else:  # close-delimited
            body = await self.rest()
        return body

    async def rest(self) -> bytes:
        """Everything until the server closes."""
        try:
            while True:
                await self._more()
        except (EOFError, trio.BrokenResourceError):
            pass
        out, self.buf = self.buf, b""
        return out


def post(path: str, body: bytes = b"", *extra: str, version: str = "1.1") -> bytes:
    head = [f"POST {path} HTTP/{version}", "Host: x", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def test_keep_alive_and_pipelined_requests_are_answered_in_order(
    nursery: trio.Nursery,
) -> None:
    addr = await start(nursery, Routes())
    client = await Client.open(addr)
    await client.send(post("/echo", b"one"))
    status, headers, body = await client.response()
    assert (status, body, headers["x-front"]) == (200, b"one", "1")
    assert "connection" not in headers and headers["server"] == "fleet" and "date" in headers
    # three requests in one write: two for the front server, then one hypercorn serves
    await client.send(post("/echo", b"two") + post("/echo", b"three") + b"GET /x HTTP/1.1\r\n")
    await client.send(b"Host: x\r\n\r\n")
    assert (await client.response())[2] == b"two"
    assert (await client.response())[2] == b"three"
    assert (await client.response())[2] == b"asgi GET /x "
    # the connection stays with hypercorn: a later inference request is answered there
    await client.send(post("/echo", b"four"))
    assert (await client.response())[2] == b"asgi POST /echo four"


async def test_pipelined_requests_past_the_head_limit_wait_behind_a_stream(
    nursery: trio.Nursery,
) -> None:
    routes = Routes()
    addr = await start(nursery, routes)
    client = await Client.open(addr)
    await client.send(post("/stream"))
    status, headers = await client.head()
    assert status == 200
    bodies = [bytes([ord("a") + i]) * 1000 for i in range(4)]
    await client.send(b"".join(post("/echo", body) for body in bodies[:3]))
    await trio.testing.wait_all_tasks_blocked()  # 3 kB behind it: reading pauses
    await client.send(post("/echo", bodies[3]))
    await trio.testing.wait_all_tasks_blocked()
    routes.release.set()
    assert await client.body(headers) == b"data: 1\n\ndata: 2\n\n"
    for body in bodies:
        assert (await client.response())[2] == body


async def test_a_request_handed_to_hypercorn_gets_its_later_bytes(nursery: trio.Nursery) -> None:
    addr = await start(nursery, Routes())
    client = await Client.open(addr)
    await client.send(post("/echo", b"one"))
    assert (await client.response())[2] == b"one"
    await client.send(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nab")
    await trio.testing.wait_all_tasks_blocked()
    await client.send(b"cdef")  # after the hand-over: hypercorn's, not the front server's
    assert (await client.response())[2] == b"asgi POST /x abcdef"


async def test_connection_close_and_http_1_0_close_after_the_response(
    nursery: trio.Nursery,
) -> None:
    addr = await start(nursery, Routes())
    client = await Client.open(addr)
    await client.send(post("/echo", b"hi", "Connection: close"))
    status, headers, body = await client.response()
    assert (status, body, headers["connection"]) == (200, b"hi", "close")
    assert await client.rest() == b""  # closed
    old = await Client.open(addr)
    await old.send(post("/echo", b"hi", version="1.0"))
    status, headers, body = await old.response()
    assert (status, body, headers["connection"]) == (200, b"hi", "close")
    assert await old.rest() == b""


async def test_an_http_1_0_stream_is_delimited_by_the_close(nursery: trio.Nursery) -> None:
    routes = Routes()
    routes.release.set()
    addr = await start(nursery, routes)
    client = await Client.open(addr)
    await client.send(post("/stream", version="1.0"))
    status, headers, body = await client.response()
    assert status == 200 and "transfer-encoding" not in headers
    assert body == b"data: 1\n\ndata: 2\n\n"


async def test_a_held_head_goes_with_the_first_chunk_the_last_with_the_end(
    nursery: trio.Nursery,
) -> None:
    routes = Routes()
    addr = await start(nursery, routes)
    client = await Client.open(addr)
    await client.send(post("/held"))
    await client._more()  # one write: the head and the first chunk come together
    assert client.buf.startswith(b"HTTP/1.1 200 ") and client.buf.endswith(b"data: 1\n\n\r\n")
    routes.release.set()
    status, headers, body = await client.response()
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    assert body == b"data: 1\n\ndata: 2\n\n"
    await client.send(post("/echo", b"next"))  # the stream ended well: the connection is kept
    assert (await client.response())[2] == b"next"


async def test_expect_100_continue_is_answered_before_the_body(nursery: trio.Nursery) -> None:
    addr = await start(nursery, Routes())
    client = await Client.open(addr)
    await client.send(post("/echo", b"", "Expect: 100-continue").replace(b"0\r\n", b"5\r\n"))
    assert (await client.head())[0] == 100
    await client.send(b"hello")
    assert (await client.response())[:3:2] == (200, b"hello")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", 400),
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 3000 + b"\r\n\r\n", 431),
        (post("/echo", b"", "X: y").replace(b"Content-Length: 0", b"Content-Length: 5000"), 413),
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
         b"800\r\n" + b"a" * 2048 + b"\r\n0\r\n\r\n", 413),
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    ],
)  # fmt: skip
async def test_bad_requests_are_refused_and_their_connection_closed(
    nursery: trio.Nursery, request_bytes: bytes, status: int
) -> None:
    addr = await start(nursery, Routes())
    client = await Client.open(addr)
    await client.send(request_bytes)
    got, headers, body = await client.response()
    assert (got, headers.get("connection")) == (status, "close"), (headers, body)
    assert await client.rest() == b""


async def test_an_answer_before_the_body_keeps_the_connection_only_if_it_was_buffered(
    nursery: trio.Nursery,
) -> None:
    addr = await start(nursery, Routes())
    client = await Client.open(addr)
    await client.send(post("/early", b"small"))  # one write: the body came with the head
    status, headers, _ = await client.response()
    assert status == 401 and "connection" not in headers
    await client.send(post("/echo", b"again"))
    assert (await client.response())[2] == b"again"
    await client.send(post("/early", b"x" * 10)[:-5])  # half of the body still to come
    status, headers, _ = await client.response()
    assert status == 401 and headers["connection"] == "close"
    assert await client.rest() == b""


async def test_slow_heads_and_bodies_time_out(nursery: trio.Nursery) -> None:
    addr = await start(nursery, Routes())
    slow_head = await Client.open(addr)
    start_at = trio.current_time()
    await slow_head.send(b"POST /echo HTTP/1.1\r\n")
    for _ in range(3):  # a byte now and then does not extend header_timeout_s
        await trio.sleep(0.1)
        await slow_head.send(b"X")
    status, headers, _ = await slow_head.response()
    assert (status, headers["connection"]) == (408, "close")
    assert await slow_head.rest() == b""
    assert LIMITS.header_timeout_s <= trio.current_time() - start_at < 3
    slow_line = await Client.open(addr)
    start_at = trio.current_time()
    await slow_line.send(b"POST /ec")  # the request line never ends
    status, headers, _ = await slow_line.response()
    assert (status, headers["connection"]) == (408, "close")
    assert LIMITS.header_timeout_s <= trio.current_time() - start_at < 3
    slow_body = await Client.open(addr)
    await slow_body.send(post("/echo", b"0123456789")[:-5])
    status, headers, _ = await slow_body.response()
    assert (status, headers["connection"]) == (408, "close")


async def test_an_idle_connection_is_closed_after_keep_alive_s(nursery: trio.Nursery) -> None:
    limits = dataclasses.replace(LIMITS, keep_alive_s=0.3)
    addr = await start(nursery, Routes(), limits=limits)
    client = await Client.open(addr)
    await client.send(post("/echo", b"x"))
    assert (await client.response())[2] == b"x"
    idle_from = trio.current_time()
    with trio.fail_after(5):  # a safety bound
        assert await client.rest() == b""  # closed by the server, with nothing more said
    assert limits.keep_alive_s <= trio.current_time() - idle_from < 3


async def test_a_client_that_leaves_cancels_its_request(nursery: trio.Nursery) -> None:
    for path in ("/wait", "/stream"):
        routes = Routes()
        addr = await start(nursery, routes)
        client = await Client.open(addr)
        await client.send(post(path))
        if path == "/stream":
            assert (await client.head())[0] == 200
        await routes.started.wait()
        await client.stream.aclose()
        with trio.fail_after(5):  # a safety bound: the handler is cancelled at once
            await routes.cleaned.wait()


async def test_a_drain_finishes_streams_then_closes_idle_connections(
    nursery: trio.Nursery,
) -> None:
    routes = Routes()
    drain, served = trio.Event(), trio.Event()

    async def run(*, task_status: trio.TaskStatus[tuple[str, int]]) -> None:
        async with trio.open_nursery() as inner:
            task_status.started(await start(inner, routes, drain, drain_s=1.0))
        served.set()

    addr = await nursery.start(run)
    idle = await Client.open(addr)
    await idle.send(post("/echo", b"x"))
    assert (await idle.response())[2] == b"x"
    streaming = await Client.open(addr)
    await streaming.send(post("/stream"))
    status, stream_headers = await streaming.head()
    assert status == 200 and "connection" not in stream_headers  # it started before the drain
    drain.set()
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(OSError):  # no longer accepting
        await trio.open_tcp_stream(*addr)
    routes.release.set()
    await streaming.send(post("/echo", b"after"))  # pipelined behind the stream
    assert await streaming.body(stream_headers) == b"data: 1\n\ndata: 2\n\n"
    status, headers, body = await streaming.response()
    assert (body, headers["connection"]) == (b"after", "close")
    assert await streaming.rest() == b""
    assert not served.is_set()  # the idle connection is left to its client until drain_s
    with trio.fail_after(5):
        assert await idle.rest() == b""  # then closed
        await served.wait()
