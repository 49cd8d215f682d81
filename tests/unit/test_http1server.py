"""The front server's HTTP/1.1 (fleet.coordinator.http1server) as plain calls: requests fed in
pieces and pipelined, bodies by length and chunked, 100-continue, HTTP/1.0, keep-alive, refused
requests, the response bytes, and header injection refused."""

from __future__ import annotations

import h11
import pytest

from fleet.coordinator.http1server import BadHeader, BadRequest, RequestHead, ServerConnection

LIMIT = 256


def post(target: str = "/v1/completions", body: bytes = b"", *extra: str, v: str = "1.1") -> bytes:
    head = [f"POST {target} HTTP/{v}", "Host: x", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def read(conn: ServerConnection) -> tuple[RequestHead, bytes]:
    """The next request whole (it must be buffered)."""
    head = conn.next_request()
    assert head is not None
    body = b""
    while (piece := conn.body()) is not None:
        assert piece, "the body should be buffered whole"
        body += piece
    return head, body


def refusal(data: bytes, closed: bool = False) -> BadRequest:
    conn = ServerConnection(LIMIT)
    conn.feed(data)
    if closed:
        conn.feed(b"")
    with pytest.raises(BadRequest) as err:
        conn.next_request()
    return err.value


# -- requests -----------------------------------------------------------------------------------


def test_a_head_fed_byte_by_byte_comes_once_whole() -> None:
    conn = ServerConnection(LIMIT)
    data = post("/v1/chat?x=1", b"{}", "X-Dup: one", "x-dup:  two \t", "Content-Type: a/b")
    for i in range(len(data) - 2):
        conn.feed(data[i : i + 1])
        if i < data.index(b"\r\n\r\n") + 3:
            assert conn.next_request() is None
    conn.feed(data[-2:])
    head, body = read(conn)
    assert head == RequestHead(
        method="POST",
        target="/v1/chat?x=1",
        version="1.1",
        headers={"host": "x", "content-length": "2", "x-dup": "two", "content-type": "a/b"},
    )
    assert body == b"{}" and conn.request_complete and conn.pending == 0


def test_the_head_agrees_with_h11s() -> None:
    for data in (
        post("/v1/completions", b"{}", "Content-Type: application/json", "Accept: */*"),
        post("/a?b=c%20d", b"", "User-Agent: curl/8.0 (x86_64)", "X-Latin: caf\u00e9", v="1.0"),
    ):
        ours, theirs = ServerConnection(LIMIT), h11.Connection(h11.SERVER)
        ours.feed(data)
        theirs.receive_data(data)
        head, event = ours.next_request(), theirs.next_event()
        assert isinstance(event, h11.Request) and head is not None
        assert head.method == event.method.decode() and head.target == event.target.decode()
        assert head.version == event.http_version.decode()
        assert head.headers == {k.decode(): v.decode("latin-1") for k, v in event.headers}


def test_pipelined_requests_keep_the_next_ones_bytes_raw() -> None:
    third = b"GET /metrics HTTP/1.1\r\nHo"
    conn = ServerConnection(LIMIT)
    conn.feed(post("/a", b"one") + post("/b", b"two") + third)
    head, body = read(conn)
    assert (head.target, body) == ("/a", b"one")
    assert conn.buffered() == post("/b", b"two") + third
    conn.respond(200, [], b"", close=False)
    assert conn.reusable
    conn.start_next()
    head, body = read(conn)
    assert (head.target, body) == ("/b", b"two")
    conn.respond(200, [], b"ok", close=False)
    conn.start_next()
    assert conn.buffered() == third  # for hypercorn, as it came
    assert conn.next_request() is None


def test_a_body_by_length_comes_in_pieces_and_is_bounded_by_it() -> None:
    conn = ServerConnection(LIMIT)
    conn.feed(post("/a", b"0123456789")[:-6])
    assert conn.next_request() is not None
    assert conn.body() == b"0123" and conn.body() == b""
    conn.feed(b"456789POST")
    assert conn.body() == b"456789" and conn.body() is None
    assert conn.buffered() == b"POST"


def test_a_body_cut_short_is_refused() -> None:
    conn = ServerConnection(LIMIT)
    conn.feed(post("/a", b"0123456789")[:-4])
    assert conn.next_request() is not None and conn.body() == b"012345"
    conn.feed(b"")
    with pytest.raises(BadRequest, match="cut short") as err:
        conn.body()
    assert err.value.status == 400


CHUNKED = (
    b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'5\r\nhello\r\n1;ext="v"\r\n \r\nA  \r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n'
)


def test_a_chunked_body_is_decoded_fed_whole_or_byte_by_byte() -> None:
    nxt = post("/b", b"next")
    whole = ServerConnection(LIMIT)
    whole.feed(CHUNKED + nxt)
    assert read(whole)[1] == b"hello 0123456789"
    assert whole.buffered() == nxt
    slow = ServerConnection(LIMIT)
    body = b""
    for i in range(len(CHUNKED + nxt)):
        slow.feed((CHUNKED + nxt)[i : i + 1])
        if slow.head is None:
            slow.next_request()
        elif not slow.request_complete:
            body += slow.body() or b""
    assert body == b"hello 0123456789" and slow.request_complete
    assert slow.buffered() == nxt


@pytest.mark.parametrize(
    "body",
    [b"zz\r\n", b"5\r\nhello0\r\n\r\n", b"5\r\nhello\r\n0\r\nno colon\r\n\r\n", b"5 x\r\n"],
)
def test_malformed_chunked_bodies_are_refused(body: bytes) -> None:
    conn = ServerConnection(LIMIT)
    conn.feed(CHUNKED.split(b"\r\n\r\n")[0] + b"\r\n\r\n" + body)
    assert conn.next_request() is not None
    with pytest.raises(BadRequest, match="chunked") as err:
        while conn.body():
            pass
    assert err.value.status == 400


def test_100_continue_is_owed_until_the_body_or_a_response_starts() -> None:
    conn = ServerConnection(LIMIT)
    conn.feed(post("/a", b"12345", "Expect: 100-continue")[:-5])
    assert conn.next_request() is not None and conn.expects_continue
    assert conn.continue_bytes() == b"HTTP/1.1 100 \r\n\r\n" and not conn.expects_continue
    early = ServerConnection(LIMIT)  # the body came anyway: nothing owed
    early.feed(post("/a", b"12345", "Expect: 100-continue"))
    assert early.next_request() is not None and not early.expects_continue
    answered = ServerConnection(LIMIT)
    answered.feed(post("/a", b"12345", "Expect: 100-continue")[:-5])
    assert answered.next_request() is not None and answered.expects_continue
    answered.respond(401, [], b"", close=True)
    assert not answered.expects_continue
    for old in (post("/a", b"1", "Expect: 100-continue", v="1.0"), post("/a", b"", "Expect: x")):
        other = ServerConnection(LIMIT)
        other.feed(old[:-1] if old.endswith(b"1") else old)
        assert other.next_request() is not None and not other.expects_continue


def test_keep_alive_is_http_1_1_without_connection_close_on_either_side() -> None:
    def served(data: bytes, close: bool = False) -> tuple[bool, bytes]:
        conn = ServerConnection(LIMIT)
        conn.feed(data)
        read(conn)
        out = conn.respond(200, [(b"content-type", b"text/plain")], b"hi", close=close)
        return conn.reusable, out

    assert served(post()) == (
        True,
        b"HTTP/1.1 200 \r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nhi",
    )
    for data, close in (
        (post("/a", b"", "Connection: Keep-Alive, Close"), False),
        (post("/a", b"", "Connection: keep-alive", v="1.0"), False),  # h11: 1.0 always closes
        (post(), True),
    ):
        reusable, out = served(data, close)
        assert not reusable and out.endswith(b"connection: close\r\n\r\nhi"), out
    conn = ServerConnection(LIMIT)
    conn.feed(post())
    read(conn)
    conn.feed(b"")  # the client closed its side
    conn.respond(200, [], b"", close=False)
    assert not conn.reusable
    with pytest.raises(AssertionError):
        conn.start_next()


def test_streams_are_chunked_for_1_1_and_close_delimited_for_1_0() -> None:
    conn = ServerConnection(LIMIT)
    conn.feed(post())
    read(conn)
    head = conn.start(200, [(b"content-type", b"text/event-stream")], close=False)
    assert head == (
        b"HTTP/1.1 200 \r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    assert conn.chunk(b"data: 1\n\n") == b"9\r\ndata: 1\n\n\r\n" and conn.chunk(b"") == b""
    assert not conn.response_complete
    assert conn.finish(b"x" * 16) == b"10\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n"
    assert conn.reusable
    old = ServerConnection(LIMIT)
    old.feed(post(v="1.0"))
    read(old)
    head = old.start(200, [], close=False)
    assert head == b"HTTP/1.1 200 \r\nconnection: close\r\n\r\n"
    assert old.chunk(b"abc") == b"abc" and old.finish(b"d") == b"d" and not old.reusable


def test_a_head_over_the_limit_is_431_one_at_it_is_read() -> None:
    line = b"POST /a HTTP/1.1\r\nHost: x\r\nX: "
    at_limit = line + b"a" * (LIMIT - len(line)) + b"\r\n\r\n"
    conn = ServerConnection(LIMIT)
    conn.feed(at_limit)
    assert conn.next_request() is not None
    over = at_limit.replace(b"X: ", b"X: a")
    assert refusal(over).status == 431
    assert refusal(over[: LIMIT + 4]).status == 431  # no end in sight: refused already
    waiting = ServerConnection(LIMIT)
    waiting.feed(over[: LIMIT + 3])
    assert waiting.next_request() is None


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        (b"POST /a HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", 400, "header"),
        (b"POST /a b HTTP/1.1\r\nHost: x\r\n\r\n", 400, "Malformed"),
        (b"POST /a HTTP/1.1\nHost: x\n\n", 400, "Malformed"),  # bare LF: llhttp refuses it
        (b"POST /a HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n", 400, "Malformed"),  # obs-fold
        (b"POST /a HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", 400, "header value"),
        (b"POST /a HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 400, "Host"),
        (b"POST /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400, "Host"),
        (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
         400, "Content-Length"),
        (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n", 400, "Transfer-Encoding"),
        (b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501,
         "chunked"),
        (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400, "Content-Length"),
    ],
)  # fmt: skip
def test_malformed_requests_are_refused_with_a_message(
    data: bytes, status: int, words: str
) -> None:
    err = refusal(data)
    assert err.status == status and words.lower() in str(err).lower(), str(err)


def test_a_client_closing_within_a_head_is_refused_before_any_byte_is_not() -> None:
    assert refusal(b"POST /a HTTP/1.1\r\nHost:", closed=True).status == 400
    conn = ServerConnection(LIMIT)
    conn.feed(b"")
    assert conn.next_request() is None and conn.closed


def test_an_upgrade_request_is_served_as_a_plain_one() -> None:
    conn = ServerConnection(LIMIT)
    conn.feed(post("/a", b"hi", "Connection: Upgrade", "Upgrade: h2c") + b"NEXT")
    head, body = read(conn)
    assert head.headers["upgrade"] == "h2c" and body == b"hi" and conn.buffered() == b"NEXT"


# -- responses ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (b"x-crlf", b"a\r\nSet-Cookie: injected"),
        (b"x-lf", b"a\nb"),
        (b"x-nul", b"a\x00b"),
        (b"bad name", b"v"),
        (b"x-split\r\nInjected", b"v"),
        (b"x-lead", b" a"),
    ],
)
def test_a_header_h11_would_refuse_is_refused_naming_it(name: bytes, value: bytes) -> None:
    conn = ServerConnection(LIMIT)
    conn.feed(post())
    read(conn)
    headers = [(b"content-type", b"text/plain"), (name, value)]
    for send in (
        lambda: conn.respond(200, headers, b"", close=False),
        lambda: conn.start(200, headers, close=False),
    ):
        with pytest.raises(BadHeader) as err:
            send()
        assert repr(name) in str(err.value)
    assert not conn.responded  # nothing was written: a clean error can still go out
    assert conn.respond(500, [], b"", close=True).startswith(b"HTTP/1.1 500 ")
