"""The engine client (fleet.coordinator.engineclient): its LIFO idle stack with plain calls, and
the client against a small h11 server on loopback that counts the connections it accepts."""

from __future__ import annotations

import gc
import json
import math
import weakref
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import h11
import pytest
import trio
import trio.testing

from fleet.coordinator.engineclient import (
    EngineBroken,
    EngineClient,
    EngineConnectError,
    EngineTimeout,
    EngineURLError,
    Response,
    Timeouts,
)
from fleet.coordinator.errors import BadGateway, NoCapacity, render
from fleet.coordinator.fastroutes import GuardedStream
from fleet.coordinator.idlestack import IdleStack
from fleet.coordinator.resilience import ResilienceConfig
from fleet.coordinator.validation import validate

from .simgateway import sim_gateway, start_hung_listener, start_sim_server

# -- the idle stack, sans-I/O --------------------------------------------------------------------


def test_idle_stack_hands_out_the_connection_used_last() -> None:
    stack: IdleStack[str] = IdleStack(max_idle=3, expiry_s=5)
    for t, conn in enumerate("abc"):
        assert stack.put(conn, float(t)) == []
    assert stack.take(3.0) == ("c", [])
    assert stack.take(3.0) == ("b", [])
    assert len(stack) == 1


def test_idle_stack_closes_the_oldest_beyond_max_idle() -> None:
    stack: IdleStack[str] = IdleStack(max_idle=2, expiry_s=5)
    stack.put("a", 0.0)
    stack.put("b", 0.0)
    assert stack.put("c", 0.0) == ["a"]
    assert IdleStack[str](max_idle=0, expiry_s=5).put("x", 0.0) == ["x"]


def test_idle_stack_expires_connections_idle_too_long() -> None:
    stack: IdleStack[str] = IdleStack(max_idle=4, expiry_s=5)
    stack.put("old", 0.0)
    stack.put("new", 3.0)
    assert stack.take(6.0) == ("new", ["old"])  # the bottom aged out, the top did not
    stack.put("x", 6.0)
    assert stack.take(11.0) == (None, ["x"])


def test_a_closed_idle_stack_keeps_nothing() -> None:
    stack: IdleStack[str] = IdleStack(max_idle=4, expiry_s=5)
    stack.put("a", 0.0)
    assert stack.close() == ["a"]
    assert stack.put("b", 1.0) == ["b"]
    assert stack.take(1.0) == (None, [])


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="read_s"):
        Timeouts(read_s=math.nan)
    with pytest.raises(ValueError, match="max_idle"):
        IdleStack(max_idle=-1, expiry_s=1)
    with pytest.raises(ValueError, match="max_connections"):
        EngineClient("http://127.0.0.1:1", max_connections=0)


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1:8000",
        "unix:///tmp/engine.sock",
        "http://127.0.0.1:8000/v1",
        "http://user:pw@127.0.0.1:8000",
        "http://127.0.0.1:8000?x=1",
        "http://:8000",
        "http://127.0.0.1:notaport",
        "127.0.0.1:8000",
    ],
)
def test_only_plain_http_base_urls_are_accepted(url: str) -> None:
    with pytest.raises(EngineURLError, match="http://host:port"):
        EngineClient(url)


def test_plain_http_base_urls_name_host_and_port() -> None:
    client = EngineClient("http://127.0.0.1:8000/")
    assert (client.host, client.port, client.authority) == ("127.0.0.1", 8000, b"127.0.0.1:8000")
    assert EngineClient("http://[::1]:9").authority == b"[::1]:9"


# -- a small engine on loopback ------------------------------------------------------------------


@dataclass
class Engine:
    """An h11 server; a request's path picks what it does (see :meth:`respond`)."""

    url: str = ""
    accepted: int = 0
    requests: list[tuple[str, bytes]] = field(default_factory=list)
    release: trio.Event = field(default_factory=trio.Event)  # ends /held responses
    idle_closed: trio.Event = field(default_factory=trio.Event)  # /close-idle closed its side
    peer_closed: trio.Event = field(default_factory=trio.Event)  # a client closed a response

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        async with trio.open_nursery() as nursery:
            task_status.started(self.url)
            await trio.serve_listeners(self.connection, listeners, handler_nursery=nursery)

    async def connection(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                target, body = b"", b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        try:
                            data = await stream.receive_some(65536)
                        except trio.BrokenResourceError:
                            return
                        if not data:
                            return
                        conn.receive_data(data)
                    elif isinstance(event, h11.Request):
                        target = bytes(event.target)
                    elif isinstance(event, h11.Data):
                        body += bytes(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        break
                self.requests.append((target.decode(), body))
                if not await self.respond(target.decode(), body, conn, stream):
                    return
                conn.start_next_cycle()

    async def respond(
        self, path: str, body: bytes, conn: h11.Connection, stream: trio.SocketStream
    ) -> bool:
        """Answer; False when the connection is to end."""

        async def send(*events: h11.Event) -> None:
            await stream.send_all(b"".join(conn.send(e) or b"" for e in events))

        if path == "/hang":  # read the request, never answer
            await trio.sleep_forever()
        if path in ("/ok", "/close-idle"):
            await send(
                h11.Response(status_code=200, headers=[("content-length", str(len(body) + 2))]),
                h11.Data(data=b"ok" + body),
                h11.EndOfMessage(),
            )
            if path == "/close-idle":  # as an engine's keep-alive timeout would, later
                self.idle_closed.set()
                return False
            return True
        head = h11.Response(
            status_code=200,
            headers=[("content-type", "text/event-stream"), ("transfer-encoding", "chunked")],
        )
        if path == "/stream":
            await send(head, *(h11.Data(data=f"data: {i}\n\n".encode()) for i in range(3)))
            await send(h11.Data(data=b"data: [DONE]\n\n"))
            await send(h11.EndOfMessage())
            return True
        if path == "/held":  # a first event, then the rest once released
            await send(head, h11.Data(data=b"data: 0\n\n"))
            with trio.move_on_after(30):
                # the client either closes (EOF) or the test releases
                async with trio.open_nursery() as nursery:

                    async def watch_eof() -> None:
                        try:
                            data = await stream.receive_some(1)
                        except trio.BrokenResourceError:
                            data = b""
                        if not data:
                            self.peer_closed.set()
                            nursery.cancel_scope.cancel()

                    nursery.start_soon(watch_eof)
                    await self.release.wait()
                    nursery.cancel_scope.cancel()
            if self.peer_closed.is_set():
                return False
            await send(h11.Data(data=b"data: [DONE]\n\n"), h11.EndOfMessage())
            return True
        await send(h11.Response(status_code=404, headers=[("content-length", "0")]))
        await send(h11.EndOfMessage())
        return True


@pytest.fixture
async def engine(nursery: trio.Nursery) -> AsyncIterator[Engine]:
    server = Engine()
    await nursery.start(server.serve)
    yield server
    nursery.cancel_scope.cancel()


async def _read(response: Response) -> bytes:
    return b"".join([chunk async for chunk in response.aiter_raw()])


# -- keep-alive ---------------------------------------------------------------------------------


async def test_one_connection_serves_sequential_requests(engine: Engine) -> None:
    client = EngineClient(engine.url)
    for i in range(5):
        response = await client.request("POST", "/ok", {"x-n": str(i)}, f"#{i}".encode())
        assert response.status == 200
        assert ("content-length", "4") in response.headers
        assert await _read(response) == f"ok#{i}".encode()
    assert engine.accepted == 1 and client.connections_opened == 1
    assert (client.in_use, client.idle) == (0, 1)
    await client.aclose()
    assert client.idle == 0


async def test_a_stream_read_to_its_end_returns_its_connection(engine: Engine) -> None:
    client = EngineClient(engine.url)
    for _ in range(3):
        response = await client.request("POST", "/stream", {}, b"{}")
        assert ("content-type", "text/event-stream") in response.headers
        chunks = [chunk async for chunk in response.aiter_raw()]
        assert b"".join(chunks).endswith(b"data: [DONE]\n\n")
        assert client.idle == 1
    assert engine.accepted == 1


async def test_an_abandoned_stream_closes_its_connection(engine: Engine) -> None:
    client = EngineClient(engine.url)
    response = await client.request("POST", "/held", {}, b"")
    events = response.aiter_raw()
    assert await events.__anext__() == b"data: 0\n\n"
    await events.aclose()  # the reader went away before the end
    assert (client.in_use, client.idle) == (0, 0)
    with trio.fail_after(5):
        await engine.peer_closed.wait()  # the engine saw the connection close
    assert await _read(await client.request("POST", "/ok", {}, b"")) == b"ok"
    assert engine.accepted == 2


async def test_a_response_closed_unread_closes_its_connection(engine: Engine) -> None:
    client = EngineClient(engine.url)
    response = await client.request("POST", "/held", {}, b"")
    response.close()
    response.close()  # idempotent
    assert (client.in_use, client.idle) == (0, 0)
    with trio.fail_after(5):
        await engine.peer_closed.wait()


async def test_a_response_closed_whole_but_unread_keeps_its_connection(engine: Engine) -> None:
    client = EngineClient(engine.url)
    response = await client.request("POST", "/ok", {}, b"")  # its body came with the head
    response.close()
    assert (client.in_use, client.idle) == (0, 1)  # the wire is clean: reused
    assert await _read(await client.request("POST", "/ok", {}, b"")) == b"ok"
    assert engine.accepted == 1


async def test_a_timed_body_read_waits_under_the_callers_scope_alone(
    engine: Engine, autojump_clock: trio.testing.MockClock
) -> None:
    client = EngineClient(engine.url, timeouts=Timeouts(read_s=2))
    response = await client.request("POST", "/held", {}, b"")
    assert await response.next_piece(timed=True) == b"data: 0\n\n"
    start = trio.current_time()
    with trio.move_on_after(5) as scope:  # no read timer at 2 s (the engine holds for 30)
        await response.next_piece(timed=True)
    assert scope.cancelled_caught and trio.current_time() - start == pytest.approx(5)
    with pytest.raises(EngineTimeout):  # untimed: the client's own timer
        await response.next_piece()
    assert trio.current_time() - start == pytest.approx(7)
    response.close()
    assert (client.in_use, client.idle) == (0, 0)


async def test_a_relayed_stream_that_goes_silent_breaks_after_the_read_timeout(
    demo_model: Path, engine: Engine, autojump_clock: trio.testing.MockClock
) -> None:
    """The relay times a stream's reads alone: at its idle limit, or at the read timeout
    where that is shorter (sim_gateway's engine pools read for 10 s; the idle limit is 60)."""
    gateway, pools = sim_gateway({"held": engine.url}, demo_model, ResilienceConfig(stall_s=600))
    assert gateway.streams.idle_s == 10
    raw = json.dumps({"model": "demo", "prompt": "hi", "max_tokens": 4, "stream": True}).encode()
    forwarded = await gateway.forward("/held", validate("completion", raw), raw, {})
    start = trio.current_time()
    async with aclosing(forwarded.body) as body:
        chunks = [chunk async for chunk in body]
    assert chunks[0] == b"data: 0\n\n"
    assert trio.current_time() - start == pytest.approx(10)  # broken at 10 s, then not resumed
    assert gateway.metrics.upstream_errors.labels(engine="held")._value.get() == 1
    assert (gateway.inflight.get("held"), pools.get(engine.url).in_use) == (0, 0)
    await pools.aclose()


async def test_a_parser_done_with_is_freed_without_the_cycle_collector(engine: Engine) -> None:
    """The httptools parser holds its ResponseParser's callbacks (a cycle): detached where
    done with, one request's parser is freed by reference counting, not left to the cycle
    collector (it made most of the generation-0 collections under load)."""
    client = EngineClient(engine.url)
    gc.disable()
    try:
        response = await client.request("POST", "/ok", {}, b"")
        parser = weakref.ref(response._conn.parser)
        assert await _read(response) == b"ok"  # reused: the next response gets a new parser
        assert parser() is None
        response = await client.request("POST", "/held", {}, b"")
        kept = response._conn.parser
        response.close()  # closed part-way: the connection and its parser are let go
        assert kept._parser is None
        kept.feed(b"HTTP/1.1 200 OK\r\n")  # ignored once detached
    finally:
        gc.enable()


async def test_a_connection_the_engine_closed_while_idle_is_retried_once(engine: Engine) -> None:
    client = EngineClient(engine.url)
    assert await _read(await client.request("POST", "/close-idle", {}, b"")) == b"ok"
    assert client.idle == 1
    with trio.fail_after(5):
        await engine.idle_closed.wait()
    response = await client.request("POST", "/ok", {}, b"again")
    assert await _read(response) == b"okagain"
    assert engine.accepted == 2 and client.connections_opened == 2
    # the engine saw each request once: the stale connection never carried the second one
    assert [path for path, _ in engine.requests] == ["/close-idle", "/ok"]


async def test_idle_connections_past_their_expiry_are_not_reused(
    engine: Engine, autojump_clock: trio.testing.MockClock
) -> None:
    client = EngineClient(engine.url, idle_expiry_s=4)
    await _read(await client.request("POST", "/ok", {}, b""))
    await trio.sleep(4)
    await _read(await client.request("POST", "/ok", {}, b""))
    assert engine.accepted == 2 and client.idle == 1


# -- errors and timeouts ------------------------------------------------------------------------


async def test_connection_refused_is_a_connect_error_filed_as_refused() -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    client = EngineClient(f"http://127.0.0.1:{port}")
    with pytest.raises(EngineConnectError, match="cannot connect") as exc:
        await client.request("POST", "/ok", {}, b"")
    assert exc.value.reason == "refused"
    assert client.in_use == 0


async def test_a_silent_engine_times_out_on_read_filed_as_timeout(
    engine: Engine, autojump_clock: trio.testing.MockClock
) -> None:
    client = EngineClient(engine.url, timeouts=Timeouts(read_s=2))
    start = trio.current_time()
    with pytest.raises(EngineTimeout, match="read timed out after 2 s") as exc:
        await client.request("POST", "/hang", {}, b"")
    assert trio.current_time() - start == pytest.approx(2)
    assert (exc.value.phase, exc.value.reason) == ("read", "timeout")
    assert (client.in_use, client.idle) == (0, 0)
    # timed: the caller's own scope bounds the wait for the head, no read timer here
    start = trio.current_time()
    with trio.move_on_after(30) as scope:
        await client.request("POST", "/hang", {}, b"", timed=True)
    assert scope.cancelled_caught and trio.current_time() - start == pytest.approx(30)
    assert (client.in_use, client.idle) == (0, 0)


async def test_a_stream_that_stops_times_out_on_read(
    engine: Engine, autojump_clock: trio.testing.MockClock
) -> None:
    client = EngineClient(engine.url, timeouts=Timeouts(read_s=3))
    response = await client.request("POST", "/held", {}, b"")
    start = trio.current_time()
    with pytest.raises(EngineTimeout, match="read"):
        await _read(response)
    assert trio.current_time() - start == pytest.approx(3)
    assert (client.in_use, client.idle) == (0, 0)


async def test_an_engine_that_closes_mid_response_breaks_it(nursery: trio.Nursery) -> None:
    async def half(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(65536)
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")

    listeners = await nursery.start(partial(trio.serve_tcp, half, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    client = EngineClient(f"http://127.0.0.1:{port}")
    response = await client.request("POST", "/x", {}, b"")
    with pytest.raises(EngineBroken) as exc:
        await _read(response)
    assert exc.value.reason == "connect"
    assert (client.in_use, client.idle) == (0, 0)


async def _serve_in_pieces(nursery: trio.Nursery, *, close_early: bool) -> str:
    """A server answering every request with a 10-byte body sent in two pieces (the second
    after a pause), or, ``close_early``, closing the connection after the first piece."""

    async def pieces(stream: trio.SocketStream) -> None:
        async with stream:
            while await stream.receive_some(65536):
                await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
                if close_early:
                    return
                await trio.sleep(0.01)
                await stream.send_all(b"defghij")

    listeners = await nursery.start(partial(trio.serve_tcp, pieces, 0, host="127.0.0.1"))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def _until_ready(response: Response) -> None:
    """Wait (5 s at most) until ``response.ready()``: its socket readable, then taken."""
    with trio.fail_after(5):
        while not response.ready():
            await trio.lowlevel.wait_readable(response._conn.sock)


async def test_ready_takes_what_the_socket_holds_so_the_next_piece_needs_no_wait(
    engine: Engine,
) -> None:
    client = EngineClient(engine.url)
    response = await client.request("POST", "/held", {}, b"")
    pieces = response.aiter_raw()
    assert await pieces.__anext__() == b"data: 0\n\n"
    assert not response.ready()  # the engine holds the rest
    engine.release.set()
    await _until_ready(response)
    with trio.testing.assert_no_checkpoints():  # here already: no wait, no timer
        assert await pieces.__anext__() == b"data: [DONE]\n\n"
    with trio.testing.assert_no_checkpoints():
        assert response.ready()  # its end came with it
        with pytest.raises(StopAsyncIteration):
            await pieces.__anext__()
    assert not response.ready()  # released
    assert (client.in_use, client.idle) == (0, 1)


async def test_ready_reports_an_engine_that_closed_mid_body(nursery: trio.Nursery) -> None:
    client = EngineClient(await _serve_in_pieces(nursery, close_early=True))
    response = await client.request("POST", "/x", {}, b"")
    pieces = response.aiter_raw()
    await _until_ready(response)  # "abc", with the head or after it
    assert await pieces.__anext__() == b"abc"
    await _until_ready(response)  # the close: the next step needs no wait either
    with pytest.raises(EngineBroken):
        await pieces.__anext__()
    assert (client.in_use, client.idle) == (0, 0)


async def test_read_all_waits_for_the_whole_body_and_keeps_the_connection(
    nursery: trio.Nursery,
) -> None:
    client = EngineClient(await _serve_in_pieces(nursery, close_early=False))
    for _ in range(2):
        response = await client.request("POST", "/x", {}, b"")
        assert await response.read_all() == b"abcdefghij"
        assert (client.in_use, client.idle) == (0, 1)
    assert client.connections_opened == 1
    with pytest.raises(RuntimeError, match="closed"):
        await response.read_all()


async def test_read_all_reads_a_chunked_body_to_its_terminator(engine: Engine) -> None:
    client = EngineClient(engine.url)
    body = await (await client.request("POST", "/stream", {}, b"")).read_all()
    assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
    assert (client.in_use, client.idle) == (0, 1)


async def test_read_all_of_a_body_cut_short_breaks_and_closes(nursery: trio.Nursery) -> None:
    client = EngineClient(await _serve_in_pieces(nursery, close_early=True))
    response = await client.request("POST", "/x", {}, b"")
    with pytest.raises(EngineBroken):
        await response.read_all()
    assert (client.in_use, client.idle) == (0, 0)


async def test_gateway_answers_a_body_cut_short_with_a_502_not_a_short_200(
    demo_model: Path, nursery: trio.Nursery
) -> None:
    """A response that is not a stream reaches the client whole or as an error: the engine
    closing part-way through its body is a 502, its slot and connection let go."""
    url = await _serve_in_pieces(nursery, close_early=True)
    gateway, pools = sim_gateway({"cut": url}, demo_model, ResilienceConfig())
    raw = json.dumps({"model": "demo", "prompt": "hello", "max_tokens": 2}).encode()
    forwarded = await gateway.forward("/v1/completions", validate("completion", raw), raw, {})
    assert forwarded.status == 200
    with pytest.raises(BadGateway) as caught:
        await forwarded.read()
    body, status, _ = render(caught.value)
    assert status == 502
    assert json.loads(body)["error"]["code"] == "upstream_broken"
    assert gateway.metrics.upstream_errors.labels(engine="cut")._value.get() == 1
    assert gateway.inflight.get("cut") == 0
    assert gateway.admission.inflight("demo") == 0
    assert (pools.get(url).in_use, pools.get(url).idle) == (0, 0)
    await pools.aclose()


async def test_a_fresh_connection_closed_without_an_answer_is_not_retried(
    nursery: trio.Nursery,
) -> None:
    accepted = 0

    async def close_at_once(stream: trio.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        async with stream:
            await stream.receive_some(65536)

    listeners = await nursery.start(partial(trio.serve_tcp, close_at_once, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    client = EngineClient(f"http://127.0.0.1:{port}")
    with pytest.raises(EngineBroken, match="closed"):
        await client.request("POST", "/x", {}, b"")
    assert accepted == 1 and client.in_use == 0


async def test_requests_wait_for_a_free_connection_then_reuse_it(engine: Engine) -> None:
    client = EngineClient(engine.url, max_connections=1)
    first = await client.request("POST", "/held", {}, b"")
    got: list[bytes] = []

    async def second() -> None:
        got.append(await _read(await client.request("POST", "/ok", {}, b"")))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        assert client.waiting == 1 and got == []
        engine.release.set()
        assert await _read(first) == b"data: 0\n\ndata: [DONE]\n\n"
    assert got == [b"ok"]
    assert engine.accepted == 1


async def test_waiting_for_a_connection_past_the_pool_timeout_fails(
    engine: Engine, autojump_clock: trio.testing.MockClock
) -> None:
    client = EngineClient(engine.url, max_connections=1, timeouts=Timeouts(pool_s=1.5))
    first = await client.request("POST", "/held", {}, b"")
    start = trio.current_time()
    with pytest.raises(EngineTimeout, match="pool") as exc:
        await client.request("POST", "/ok", {}, b"")
    assert trio.current_time() - start == pytest.approx(1.5)
    assert exc.value.reason == "timeout"
    assert (client.in_use, client.waiting) == (1, 0)
    first.close()
    assert client.in_use == 0


async def test_a_request_cancelled_midway_releases_its_connection(
    engine: Engine, autojump_clock: trio.testing.MockClock
) -> None:
    client = EngineClient(engine.url)
    await _read(await client.request("POST", "/ok", {}, b""))
    with trio.move_on_after(1) as scope:
        await client.request("POST", "/hang", {}, b"")
    assert scope.cancelled_caught
    assert (client.in_use, client.idle) == (0, 0)  # closed: its exchange was left part-way
    assert await _read(await client.request("POST", "/ok", {}, b"")) == b"ok"
    assert engine.accepted == 2


# -- through the gateway ------------------------------------------------------------------------


async def test_gateway_streams_reuse_their_engine_connection(
    demo_model: Path, nursery: trio.Nursery
) -> None:
    """A stream is read past ``[DONE]`` to its chunked terminator, so its connection is kept."""
    _, url = await start_sim_server(demo_model, nursery)
    gateway, pools = sim_gateway({"a": url}, demo_model, ResilienceConfig())
    for stream in (True, True, False, True):
        body = {"model": "demo", "prompt": "hello there", "max_tokens": 4, "stream": stream}
        raw = json.dumps(body).encode()
        parsed = validate("completion", raw)
        forwarded = await gateway.forward("/v1/completions", parsed, raw, {})
        assert forwarded.status == 200
        text = b"".join([chunk async for chunk in forwarded.body])
        assert text.endswith(b"data: [DONE]\n\n") == stream
    client = pools.get(url)
    assert client.connections_opened == 1
    assert (client.in_use, client.idle) == (0, 1)
    await pools.aclose()


async def test_a_stream_closed_before_its_first_read_lets_go_of_its_engine(
    demo_model: Path, nursery: trio.Nursery
) -> None:
    """The client left between the response's head and its first piece: closing the reply's
    stream releases the engine's count, its connection and the admission slot (a generator
    closed unstarted runs no ``finally``: without the guard all three were held for good)."""
    _, url = await start_sim_server(demo_model, nursery)
    gateway, pools = sim_gateway({"a": url}, demo_model, ResilienceConfig())
    raw = json.dumps({"model": "demo", "prompt": "hi", "max_tokens": 4, "stream": True}).encode()

    def held() -> tuple[int, int, int]:
        return gateway.inflight.get("a"), gateway.admission.inflight("demo"), pools.get(url).in_use

    forwarded = await gateway.forward("/v1/completions", validate("completion", raw), raw, {})
    assert held() == (1, 1, 1)
    await GuardedStream(forwarded.body, forwarded.discard).aclose()
    assert held() == (0, 0, 0)
    # read part-way, then closed: the stream's own end lets go (discard is not called twice)
    forwarded = await gateway.forward("/v1/completions", validate("completion", raw), raw, {})
    async with aclosing(GuardedStream(forwarded.body, forwarded.discard)) as stream:
        assert (await stream.__anext__()).startswith(b"data: ")
        assert held() == (1, 1, 1)
    assert held() == (0, 0, 0)
    await pools.aclose()


async def test_gateway_files_engine_failures_under_their_reasons(
    demo_model: Path, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A hung engine times out on read (``timeout``); a closed port refuses (``refused``: the
    engine is ejected at once)."""
    hung = await start_hung_listener(nursery)
    refused = trio.socket.socket()
    await refused.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{refused.getsockname()[1]}"
    refused.close()
    raw = json.dumps({"model": "demo", "prompt": "hello", "max_tokens": 2}).encode()
    for engine_id, url, error in (("hung", hung, "EngineTimeout"), ("dead", dead, "Connect")):
        gateway, pools = sim_gateway({engine_id: url}, demo_model, ResilienceConfig())
        start = trio.current_time()
        with pytest.raises(NoCapacity, match=error):
            await gateway.forward("/v1/completions", validate("completion", raw), raw, {})
        if engine_id == "hung":  # sim_gateway's pools time out reads after 10 s
            assert trio.current_time() - start == pytest.approx(10)
            assert gateway.breakers.get(engine_id).state == "closed"  # one failure of five
        else:
            assert gateway.breakers.get(engine_id).state == "open"  # refused: ejected
        assert gateway.metrics.upstream_errors.labels(engine=engine_id)._value.get() == 1
        assert gateway.inflight.get(engine_id) == 0
        assert (pools.get(url).in_use, pools.get(url).idle) == (0, 0)
        await pools.aclose()
