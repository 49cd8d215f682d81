"""The HTTP/1.1 a front server speaks to its clients, sans-I/O: requests read, responses built.

Request heads are checked by httptools (llhttp, as on the engine side: :mod:`.http1client`),
not h11, whose event machinery took about 14% of the coordinator's GIL time per plain request.
Measured in-process (2026-12-07, this machine), one typical plain request read and answered as
the front server does it: h11 57 µs, this module 12 µs (its head alone 5.6 µs against 22.5).
llhttp parses several pipelined messages in one call and does not say where one ended, so it
is fed one head at a time, up to its blank line, and only checks it (the fields are then split
here, one ``name: value`` a line): every byte after the head stays raw
(:meth:`ServerConnection.buffered`: ``frontpolicy.classify`` reads the next request's line
there, and a connection handed to hypercorn takes them all). The body is framed here:
``Content-Length`` counted, chunked decoded (a small strict decoder; extensions and trailers
skipped).

The rules are h11's, stricter where llhttp is (bare LF line ends, folded or control
characters in a header, a duplicate ``Content-Length``, or one beside ``Transfer-Encoding``
are refused):

- a request is refused (:class:`BadRequest`) when malformed, its head is over
  ``max_head_bytes`` (431), an HTTP/1.1 one has no single ``Host``, or its
  ``Transfer-Encoding`` is other than ``chunked`` (501);
- the connection is kept only for HTTP/1.1 without ``Connection: close`` on either side
  (an HTTP/1.0 client's ``keep-alive`` is not honoured);
- ``100 Continue`` is owed to an HTTP/1.1 request with ``Expect: 100-continue`` until its body
  starts or a response does;
- a whole response carries ``Content-Length``; a streamed one is chunked for HTTP/1.1, delimited
  by the close for HTTP/1.0; a response header name or value h11 would refuse (CR, LF, NUL:
  :mod:`.wireheaders`) raises :class:`BadHeader`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import httptools

from . import wireheaders

_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\r\n")
_TRAILER = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+:[^\r\n\x00]*\r\n")
_LF_END = re.compile(rb"\n\r?\n")  # a blank line with a bare LF: llhttp refuses it, at once
_WATCHED = frozenset({"host", "transfer-encoding", "connection"})  # where repeats count
CONTINUE = b"HTTP/1.1 100 \r\n\r\n"


class BadRequest(Exception):
    """Raised when a request cannot be read; ``status`` (400, 431, 501) answers it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class BadHeader(ValueError):
    """Raised when a response header would not be sent as given (h11's rules); names it."""


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A request's line and headers: ``headers`` has lower-case names, the last value of a
    repeated one (blanks around it stripped)."""

    method: str
    target: str
    version: str  # "1.1" or "1.0"
    headers: dict[str, str]


class _Checked:
    """llhttp's one callback here: the head it was fed is whole (and valid)."""

    __slots__ = ("complete",)

    def __init__(self) -> None:
        self.complete = False

    def on_headers_complete(self) -> None:
        self.complete = True


class ServerConnection:
    """One client connection's HTTP/1.1: :meth:`feed` bytes, :meth:`next_request` until a head
    comes, :meth:`body` until it says the end; answer with :meth:`respond` or :meth:`start`,
    :meth:`chunk`, :meth:`finish`; :meth:`start_next` when :attr:`reusable`.

    Args:
        max_head_bytes: a request line plus headers (blank line excluded) longer is refused 431.
    """

    def __init__(self, max_head_bytes: int) -> None:
        self.max_head_bytes = max_head_bytes
        self.closed = False  # the client's end came (fed b"")
        self._buf = b""
        self._pos = 0  # consumed up to here
        self._reset()

    def _reset(self) -> None:
        self.head: RequestHead | None = None
        self.keep_alive = True  # both sides allow another request after this one
        self.request_complete = False  # the request's body was read to its end
        self.response_complete = False
        self.responded = False  # a response (not a 100) started
        self._continue = False  # 100 Continue owed
        self._http10 = False
        self._chunked = False
        self._left = 0  # bytes left of the body, or of the current chunk
        self._crlf = False  # a chunk's data ended: its CRLF next
        self._trailers = False  # the last chunk came: trailer lines until a blank one
        self._extra = 0  # chunk-size and trailer bytes read, bounded by max_head_bytes

    # -- input --------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Bytes from the client; ``b""``: it closed its side."""
        if not data:
            self.closed = True
        elif self._pos >= len(self._buf):
            self._buf, self._pos = data, 0
        else:
            self._buf, self._pos = self._buf[self._pos :] + data, 0

    @property
    def pending(self) -> int:
        """How many bytes were fed and not consumed."""
        return len(self._buf) - self._pos

    def buffered(self) -> bytes:
        """The bytes fed and not consumed: the rest of this request, and any after it."""
        return self._buf[self._pos :] if self._pos else self._buf

    def next_request(self) -> RequestHead | None:
        """The next request's head, once all of it came; None: more bytes needed (or the
        client closed before a byte of it: :attr:`closed`).

        Raises:
            BadRequest: malformed, too long, or the client closed within it.
        """
        assert self.head is None, "next_request() again before start_next()"
        buf, pos, limit = self._buf, self._pos, self.max_head_bytes
        end = buf.find(b"\r\n\r\n", pos, pos + limit + 4)
        if end < 0:
            bare = _LF_END.search(buf, pos, pos + limit + 4)
            if bare is not None:
                end = bare.end() - 4  # llhttp refuses it, with its message
            elif len(buf) - pos >= limit + 4:
                raise BadRequest(431, f"The request's headers exceed {limit} bytes.")
            elif self.closed and len(buf) > pos:
                raise BadRequest(400, "The connection closed within the request's headers.")
            else:
                return None
        head = buf[pos : end + 4]
        checked = _Checked()
        try:
            httptools.HttpRequestParser(checked).feed_data(head)
        except httptools.HttpParserUpgrade:
            pass  # an Upgrade request, served as a plain one (h11 does the same)
        except httptools.HttpParserError as exc:
            raise BadRequest(400, f"Malformed request: {exc}") from exc
        if not checked.complete:
            raise BadRequest(400, "Malformed request: incomplete headers.")
        self._pos = end + 4
        self.head = self._read(head.decode("latin-1"))
        return self.head

    def _read(self, text: str) -> RequestHead:
        """The head llhttp found valid (CRLF line ends, one ``name: value`` a line, a token
        for a name), and what it says of the body and the connection."""
        lines = text.split("\r\n")
        line = lines[0].split()
        if len(line) != 3 or line[2] not in ("HTTP/1.1", "HTTP/1.0"):
            raise BadRequest(400, f"Malformed request line: {lines[0][:80]!r}")
        headers: dict[str, str] = {}
        repeated: dict[str, list[str]] = {}  # every value of a _WATCHED header said twice
        for field in lines[1:-2]:
            name, _, value = field.partition(":")
            name, value = name.lower(), value.strip(" \t")
            if name in headers and name in _WATCHED:
                repeated.setdefault(name, [headers[name]]).append(value)
            headers[name] = value
        version = line[2][5:]
        self._http10 = version == "1.0"
        if not self._http10 and ("host" not in headers or "host" in repeated):
            raise BadRequest(400, "Malformed request: an HTTP/1.1 request needs one Host header.")
        coding = headers.get("transfer-encoding")
        if coding is not None:
            coding = ",".join(repeated.get("transfer-encoding", [coding]))
            if [c.strip().lower() for c in coding.split(",")] != ["chunked"]:
                raise BadRequest(501, "Only Transfer-Encoding: chunked is supported.")
            self._chunked = True
        else:
            self._left = int(headers.get("content-length", "0"))  # llhttp checked its digits
            self.request_complete = not self._left
        tokens = ",".join(repeated.get("connection", [headers.get("connection", "")]))
        if self._http10 or "close" in (t.strip() for t in tokens.lower().split(",")):
            self.keep_alive = False
        if not self._http10 and not self.request_complete and "expect" in headers:
            expect = headers["expect"].lower()
            self._continue = "100-continue" in (t.strip() for t in expect.split(","))
        return RequestHead(line[0], line[1], version, headers)

    def body(self) -> bytes | None:
        """The request's body bytes that came since the last call, joined (``b""``: none yet,
        wait for more), or None at its end (then :attr:`request_complete`).

        Raises:
            BadRequest: malformed chunked encoding, or the client closed within the body.
        """
        if self.request_complete:
            return None
        if self._chunked:
            data = self._dechunk()
        else:
            take = min(self._left, len(self._buf) - self._pos)
            data = self._buf[self._pos : self._pos + take]
            self._pos += take
            self._left -= take
            self.request_complete = not self._left
        if data:
            self._continue = False
            return data
        if self.request_complete:
            return None
        if self.closed:
            raise BadRequest(400, "The request's body was cut short.")
        return b""

    def _dechunk(self) -> bytes:
        """Decode what came of a chunked body: its data, joined."""
        buf, pos, pieces = self._buf, self._pos, []
        while True:
            if self._left:
                take = min(self._left, len(buf) - pos)
                if not take:
                    break
                pieces.append(buf[pos : pos + take])
                pos += take
                self._left -= take
                if self._left:
                    break
                self._crlf = True
            if self._crlf:
                if len(buf) - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise BadRequest(400, "Malformed chunked body: no CRLF after a chunk.")
                pos += 2
                self._crlf = False
            line = _TRAILER if self._trailers else _CHUNK_SIZE
            if self._trailers and buf.startswith(b"\r\n", pos):
                pos += 2
                self.request_complete = True
                break
            match = line.match(buf, pos)
            if match is None:
                window = buf[pos : pos + self.max_head_bytes]
                if b"\n" in window or len(window) >= self.max_head_bytes:
                    raise BadRequest(400, "Malformed chunked body: a bad chunk-size or trailer.")
                break
            self._extra += match.end() - pos
            if self._extra > self.max_head_bytes:
                raise BadRequest(400, "Malformed chunked body: chunk headers too long.")
            pos = match.end()
            if not self._trailers:
                self._left = int(match[1], 16)
                self._trailers = not self._left
        self._pos = pos
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    @property
    def expects_continue(self) -> bool:
        """Whether the client waits for ``100 Continue`` before it sends the body."""
        return self._continue and not self.responded and self.pending == 0

    # -- output -------------------------------------------------------------------------------

    def continue_bytes(self) -> bytes:
        """``100 Continue`` (then no longer owed)."""
        self._continue = False
        return CONTINUE

    def respond(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, *, close: bool
    ) -> bytes:
        """A whole response: its head (with ``Content-Length``) and ``body``; ``close``: the
        connection closes after it."""
        head = self._head(status, headers, len(body), close)
        self.response_complete = True
        return head + body if body else head

    def start(self, status: int, headers: list[tuple[bytes, bytes]], *, close: bool) -> bytes:
        """A streamed response's head: chunked, or delimited by the close (HTTP/1.0)."""
        return self._head(status, headers, None, close)

    def chunk(self, data: bytes) -> bytes:
        """One piece of a streamed response, framed (``b""`` for none)."""
        if not data or self._http10:
            return data
        return b"%x\r\n%b\r\n" % (len(data), data)

    def finish(self, data: bytes = b"") -> bytes:
        """The last piece of a streamed response and its end, framed."""
        self.response_complete = True
        return data if self._http10 else self.chunk(data) + b"0\r\n\r\n"

    def _head(
        self, status: int, headers: list[tuple[bytes, bytes]], length: int | None, close: bool
    ) -> bytes:
        if not wireheaders.valid(headers):
            for name, value in headers:
                if not wireheaders.valid([(name, value)]):
                    raise BadHeader(f"invalid response header {name!r}: {value!r}")
        self.responded = True
        self._continue = False
        if close or length is None and self._http10:
            self.keep_alive = False
        lines = [b"HTTP/1.1 %d \r\n" % status]
        for name, value in headers:
            lines += (name, b": ", value, b"\r\n")
        if length is not None:
            lines.append(b"content-length: %d\r\n" % length)
        elif not self._http10:
            lines.append(b"transfer-encoding: chunked\r\n")
        if not self.keep_alive:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    # -- the next request ---------------------------------------------------------------------

    @property
    def reusable(self) -> bool:
        """Whether another request may follow on the connection: both messages ended, both
        sides allow it, and the client is still there."""
        return (
            self.keep_alive and self.request_complete and self.response_complete and not self.closed
        )

    def start_next(self) -> None:
        """Forget the request served (the connection is :attr:`reusable`): the next one's
        bytes, if any came, are :meth:`buffered`."""
        assert self.reusable, "start_next() on a connection that is not reusable"
        if self._pos:
            self._buf, self._pos = self._buf[self._pos :], 0
        self._reset()


__all__ = ["CONTINUE", "BadHeader", "BadRequest", "RequestHead", "ServerConnection"]
