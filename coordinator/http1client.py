"""The HTTP/1.1 a client speaks to an engine, sans-I/O: a request's bytes, a response parsed.

Why not h11 here: on the coordinator's request path h11's event machinery (a state machine
per connection, an event object per header block and body piece, its checks run twice) took
about 12% of the CPU on the engine side alone. An engine speaks one narrow kind of HTTP: a
response to a ``POST``, framed by ``Content-Length`` or chunked (a stream), rarely closed to
end it. This parser handles exactly that, with the checks that decide framing and reuse:

- status line ``HTTP/1.x NNN reason``; ``1xx`` responses are skipped;
- header lines ``name: value`` (names lower-cased; no line folding, no spaces before the
  colon, nothing that is not a token in a name);
- the body: ``Transfer-Encoding: chunked`` (extensions and trailers ignored), else
  ``Content-Length``, else until the connection closes; none for ``204`` and ``304``;
- reuse only after an HTTP/1.1 response without ``Connection: close``, read to its end.

Anything else raises :class:`BadResponse` (the connection is then closed).
"""

from __future__ import annotations

import re

MAX_HEAD_BYTES = 65536  # a response head (or a chunk's size line) longer than this is refused

_STATUS = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [^\r\n]*)?")
_HEADER = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\r\n]*?)[ \t]*")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?")


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
        self._buf = bytearray()
        self.closed = False  # the connection's end came (fed b"")
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.reusable = False  # after the end: the connection may carry another request
        self.complete = False  # the body was read to its end
        self._keep_alive = False
        self._length = -1  # bytes of body (or of the current chunk) left; -1: until closed
        self._chunked = False
        self._in_chunk = False  # reading a chunk's data (else at a size line)

    def feed(self, data: bytes) -> None:
        """Bytes from the connection; ``b""``: it closed."""
        if data:
            self._buf += data
        else:
            self.closed = True

    def buffered(self) -> bool:
        """Whether bytes are waiting to be parsed."""
        return bool(self._buf)

    def head(self) -> bool:
        """Parse the response head (skipping ``1xx`` ones); False: more bytes are needed.

        Raises:
            BadResponse: malformed, too long, or the connection closed within it.
        """
        while not self.status:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEAD_BYTES:
                    raise BadResponse("the response head is too long")
                if self.closed:
                    raise BadResponse("the connection closed within the response head")
                return False
            if end > MAX_HEAD_BYTES:
                raise BadResponse("the response head is too long")
            lines = bytes(self._buf[:end]).split(b"\r\n")
            del self._buf[: end + 4]
            status = _STATUS.fullmatch(lines[0])
            if status is None:
                raise BadResponse(f"bad status line {lines[0][:80]!r}")
            code = int(status.group(2))
            if 100 <= code < 200:
                continue  # informational (100 Continue): the real response follows
            self._start(code, status.group(1) == b"1", lines[1:])
        return True

    def _start(self, code: int, http11: bool, lines: list[bytes]) -> None:
        headers = []
        length = chunked = close = None
        for line in lines:
            match = _HEADER.fullmatch(line)
            if match is None:
                raise BadResponse(f"bad header line {line[:80]!r}")
            name = match.group(1).lower().decode("ascii")
            value = match.group(2).decode("latin-1")
            headers.append((name, value))
            if name == "content-length":
                if not value.isdigit() or length is not None and int(value) != length:
                    raise BadResponse(f"bad content-length {value[:40]!r}")
                length = int(value)
            elif name == "transfer-encoding":
                if value.lower() != "chunked" or chunked:
                    raise BadResponse(f"unsupported transfer-encoding {value[:40]!r}")
                chunked = True
            elif name == "connection":
                close = close or "close" in value.lower().replace(" ", "").split(",")
        self.status, self.headers = code, headers
        self._keep_alive = http11 and not close
        if code in (204, 304):
            self._length = 0
        elif chunked:
            self._chunked, self._length = True, 0
        elif length is not None:
            self._length = length
        else:
            self._keep_alive = False  # delimited by the close: never reused
        if not self._chunked and self._length == 0:
            self._end()

    def body(self) -> bytes | None:
        """The body bytes buffered now, joined (``b""``: none yet, wait for more), or None at
        the end of the body (then :attr:`complete`; :attr:`reusable` says whether the
        connection may carry another request).

        Raises:
            BadResponse: malformed chunked framing, or the connection closed early.
        """
        if self.complete:
            return None
        if not self._chunked:
            if self._length < 0:  # until closed
                data = bytes(self._buf)
                self._buf.clear()
                if not data and self.closed:
                    self._end()
                    return None
                return data
            data = bytes(self._buf[: self._length])
            del self._buf[: self._length]
            self._length -= len(data)
            if not self._length:
                self._end()
                return data or None
            if self.closed and not data:
                raise BadResponse("the connection closed within the response body")
            return data
        return self._chunks()

    def _chunks(self) -> bytes | None:
        parts: list[bytes] = []
        buf = self._buf
        while True:
            if self._in_chunk:  # a chunk's data, then its CRLF
                if self._length:
                    take = bytes(buf[: self._length])
                    del buf[: self._length]
                    self._length -= len(take)
                    if take:
                        parts.append(take)
                    if self._length:
                        break
                if len(buf) < 2:
                    break
                if buf[:2] != b"\r\n":
                    raise BadResponse("a chunk does not end with CRLF")
                del buf[:2]
                self._in_chunk = False
            end = buf.find(b"\r\n")  # a size line
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    raise BadResponse("a chunk size line is too long")
                break
            size = _CHUNK_SIZE.fullmatch(buf, 0, end)
            if size is None:
                raise BadResponse(f"bad chunk size line {bytes(buf[: min(end, 40)])!r}")
            length = int(size.group(1), 16)
            if length:
                del buf[: end + 2]
                self._length, self._in_chunk = length, True
                continue
            # the last chunk: trailer lines (ignored), then a blank line
            if buf.startswith(b"\r\n", end + 2):
                stop = end + 4
            else:
                trailers = buf.find(b"\r\n\r\n", end + 2)
                if trailers < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        raise BadResponse("the chunked trailers are too long")
                    break
                stop = trailers + 4
            del buf[:stop]
            self._end()
            return b"".join(parts) if parts else None
        if self.closed and not parts:
            raise BadResponse("the connection closed within the chunked body")
        return b"".join(parts)

    def _end(self) -> None:
        self.complete = True
        self.reusable = self._keep_alive and not self._buf and not self.closed


__all__ = ["MAX_HEAD_BYTES", "BadResponse", "ResponseParser", "request_bytes"]
