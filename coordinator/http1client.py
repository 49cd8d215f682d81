"""The HTTP/1.1 a client speaks to an engine, sans-I/O: a request's bytes, a response parsed.

Responses are parsed by httptools (MagicStack's binding of llhttp, Node.js's C parser), not h11:
on the coordinator's request path h11's event machinery took about 12% of the CPU on the engine
side alone. Measured in-process (2026-12-07, this machine), a plain JSON response and a
16-event stream in 18 pieces: this module 4.6 and 13.1 µs (httptools alone 1.6 and 4.7), a
hand-written regex parser it replaced 7.4 and 46 µs, h11 41 and 208 µs. llhttp does the
framing (``Content-Length``, chunked, until the close; ``1xx`` skipped; none for
``204``/``304``) and the strict checks; on top of it:

- a ``Transfer-Encoding`` other than ``chunked`` is refused (llhttp would read until the close);
- a head longer than :data:`MAX_HEAD_BYTES` is refused;
- reuse only after a keep-alive response read to its end with nothing after it.

Anything else raises :class:`BadResponse` (the connection is then closed).
"""

from __future__ import annotations

import httptools

MAX_HEAD_BYTES = 65536  # a response head longer than this is refused


class BadResponse(Exception):
    """Raised when the engine's response is not HTTP/1.1 this client reads."""


def request_bytes(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """A request's head (the body follows it as is); ``headers`` are valid already."""
    lines = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


class ResponseParser:
    """One response on a connection: :meth:`feed` bytes as they come, :meth:`head` until it
    returns the head, then :meth:`body` until it says the end."""

    def __init__(self) -> None:
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.closed = False  # the connection's end came (fed b"")
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.reusable = False  # after the end: the connection may carry another request
        self.complete = False  # the body was read to its end
        self._body: list[bytes] = []
        self._head_bytes = 0  # fed before the head was whole
        self._keep_alive = False
        self._until_close = False  # a body with neither length nor chunks
        self._error = ""  # what was wrong with it, raised by head() and body()
        self._in_head = False  # between a message's begin and its head's end

    def detach(self) -> None:
        """Drop the httptools parser, which holds this object's callbacks: the two form a
        reference cycle that only the cyclic garbage collector would free (one per request,
        measured: about half of what it found in generation 0). Call it where the parser is
        done with (its connection closed, or the next response gets a new parser); bytes fed
        after are ignored."""
        self._parser = None
        self.reusable = False

    def feed(self, data: bytes) -> None:
        """Bytes from the connection; ``b""``: it closed. What is wrong with them is raised
        by the next :meth:`head` or :meth:`body`."""
        if self._parser is None:
            return
        if not data:
            self.closed = True
            if self.status and not self.complete and self._until_close:
                self.complete = True  # its end is the close; never reused
            return
        if self.complete or self._error:  # bytes past the response: not reused
            self.reusable = False
            return
        if not self.status:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if not self.complete:  # (past the end: only not reusable)
                self._error = f"malformed response: {exc}"
            self.reusable = False
        if not self.status and self._head_bytes > MAX_HEAD_BYTES:
            self._error = "the response head is too long"

    def buffered(self) -> bool:
        """Whether body bytes are waiting to be taken."""
        return bool(self._body)

    def head(self) -> bool:
        """Whether the response head is in (``1xx`` ones skipped); False: more bytes needed.

        Raises:
            BadResponse: malformed, too long, or the connection closed within it.
        """
        if self._error:
            raise BadResponse(self._error)
        if self.status:
            return True
        if self.closed:
            raise BadResponse("the connection closed within the response head")
        return False

    def body(self) -> bytes | None:
        """The body bytes received since the last call, joined (``b""``: none yet, wait for
        more), or None at the end of the body (then :attr:`complete`; :attr:`reusable` says
        whether the connection may carry another request).

        Raises:
            BadResponse: malformed, or the connection closed within the body.
        """
        if self._error:
            raise BadResponse(self._error)
        if self._body:
            data = self._body[0] if len(self._body) == 1 else b"".join(self._body)
            self._body.clear()
            return data
        if self.complete:
            return None
        if self.closed:
            raise BadResponse("the connection closed within the response body")
        return b""

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:  # a second response on the connection
            self.reusable = False
        self.headers, self._in_head = [], True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # (not a chunked body's trailers)
            value = value.strip(b" \t")
            self.headers.append((name.decode("ascii").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._in_head = False
        assert self._parser is not None  # (a callback: fed, so not detached)
        code = self._parser.get_status_code()
        if 100 <= code < 200:
            return  # informational (100 Continue): the real response follows
        framing = {n: v for n, v in self.headers if n in ("transfer-encoding", "content-length")}
        te = framing.get("transfer-encoding")
        if te is not None and te.strip().lower() != "chunked":
            self._error = f"unsupported transfer-encoding {te[:40]!r}"
        self._until_close = (
            te is None and "content-length" not in framing and code not in (204, 304)
        )
        self.status = code

    def on_body(self, data: bytes) -> None:
        self._body.append(data)

    def on_message_complete(self) -> None:
        if not self.status or self.complete:
            return  # the end of a 1xx
        self.complete = True
        assert self._parser is not None
        self.reusable = self._parser.should_keep_alive() and not self._until_close


__all__ = ["MAX_HEAD_BYTES", "BadResponse", "ResponseParser", "request_bytes"]
