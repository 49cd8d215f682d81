"""The engine client's HTTP/1.1 (sans-I/O): responses as h11 writes them, fed in every split,
parse to the same head and body; malformed ones are refused."""

from __future__ import annotations

import h11
import pytest

from fleet.coordinator.http1client import BadResponse, ResponseParser, request_bytes


def h11_response(status: int, headers: list[tuple[str, str]], chunks: list[bytes]) -> bytes:
    """A response as an h11 server writes it (after a POST)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(conn.next_event(), h11.Request)
    conn.next_event()
    out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
    for chunk in chunks:
        out += conn.send(h11.Data(data=chunk)) or b""
    return out + (conn.send(h11.EndOfMessage()) or b"")


def parse(data: bytes, pieces: list[int], *, close: bool = False) -> tuple[ResponseParser, bytes]:
    """Feed ``data`` cut at ``pieces`` (then the close, if ``close``); the parser and body."""
    parser = ResponseParser()
    body = b""
    start = 0
    cuts = [*pieces, len(data)]
    head = False
    for cut in cuts:
        if cut > start:  # (b"" would say the connection closed)
            parser.feed(data[start:cut])
        start = max(start, cut)
        if not head:
            head = parser.head()
        if head:
            while (got := parser.body()) is not None and got:
                body += got
            if parser.complete:
                break
    if close and not parser.complete:
        parser.feed(b"")
        while (got := parser.body()) is not None:
            body += got
    return parser, body


CASES = [
    (200, [("content-type", "application/json")], [b'{"ok": true}']),
    (200, [("content-type", "text/event-stream"), ("transfer-encoding", "chunked")],
     [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"]),
    (503, [("content-length", "0")], []),
]  # fmt: skip


@pytest.mark.parametrize("status,headers,chunks", CASES)
def test_every_split_of_an_h11_response_parses_to_its_head_and_body(
    status: int, headers: list[tuple[str, str]], chunks: list[bytes]
) -> None:
    if not any(k == "transfer-encoding" for k, _ in headers):
        headers = [*headers, ("content-length", str(sum(map(len, chunks))))]
    data = h11_response(status, headers, chunks)
    for cut in range(len(data) + 1):
        for second in (cut, min(cut + 7, len(data))):
            parser, body = parse(data, [cut, second])
            assert (parser.status, parser.complete, parser.reusable) == (status, True, True)
            assert dict(parser.headers)["content-type" if chunks else "content-length"]
            assert body == b"".join(chunks), (cut, second)


def test_chunk_extensions_trailers_and_informational_responses() -> None:
    data = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A:  spaced value \r\n\r\n"
        b"5;name=value\r\nhello\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n"
    )
    for cut in range(len(data) + 1):
        parser, body = parse(data, [cut])
        assert body == b"hello0123456789" and parser.reusable
        assert parser.headers == [("transfer-encoding", "chunked"), ("x-a", "spaced value")]


def test_a_whole_stream_that_came_at_once_is_one_piece() -> None:
    parser = ResponseParser()
    parser.feed(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n"
    )
    assert parser.head() and parser.body() == b"abc" and parser.complete
    assert parser.body() is None


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n",
    ],
)
def test_a_response_that_closes_is_not_reused(head: bytes) -> None:
    parser, body = parse(head + b"ok", [])
    assert (body, parser.complete, parser.reusable) == (b"ok", True, False)


def test_a_body_without_length_lasts_until_the_close() -> None:
    parser, body = parse(b"HTTP/1.1 200 OK\r\n\r\nall of it", [20], close=True)
    assert (body, parser.complete, parser.reusable) == (b"all of it", True, False)


def test_no_content_has_no_body() -> None:
    parser, body = parse(b"HTTP/1.1 204 No Content\r\n\r\n", [])
    assert (body, parser.complete, parser.reusable) == (b"", True, True)


def test_bytes_past_the_response_make_it_not_reusable() -> None:
    parser, body = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nxy", [])
    assert (body, parser.complete, parser.reusable) == (b"x", True, False)


@pytest.mark.parametrize(
    "data,match",
    [
        (b"HTTP/2 200 OK\r\n\r\n", "Expected dot"),
        (b"HTTP/1.1 20 OK\r\n\r\n", "Invalid status code"),
        (b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n", "Invalid header token"),
        (b"HTTP/1.1 200 OK\r\n folded\r\n\r\n", "Unexpected space"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Invalid character in Content-Length"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "Duplicate Content-Length",
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "transfer-encoding"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "Invalid character in chunk size",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n",
            "Expected LF after chunk data",
        ),
    ],
)
def test_malformed_responses_are_refused(data: bytes, match: str) -> None:
    parser = ResponseParser()
    parser.feed(data)
    with pytest.raises(BadResponse, match=match):
        assert parser.head()
        parser.body()


@pytest.mark.parametrize(
    "data,match",
    [
        (b"HTTP/1.1 200", "within the response head"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", "within the response body"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
            "within the response body",
        ),
    ],
)
def test_a_connection_closed_early_is_refused(data: bytes, match: str) -> None:
    parser = ResponseParser()
    parser.feed(data)
    with pytest.raises(BadResponse, match=match):
        if parser.head():
            assert parser.body()  # what came before the close is passed on first
        parser.feed(b"")
        if parser.head():
            parser.body()


def test_a_request_head_is_what_h11_reads() -> None:
    data = request_bytes(
        b"POST", b"/v1/completions", [(b"host", b"e:1"), (b"content-length", b"2")]
    )
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data + b"{}")
    request = conn.next_event()
    assert isinstance(request, h11.Request)
    assert (request.method, request.target) == (b"POST", b"/v1/completions")
    assert list(request.headers) == [(b"host", b"e:1"), (b"content-length", b"2")]
    assert conn.next_event() == h11.Data(data=b"{}")
