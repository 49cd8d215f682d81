"""One request on the front server (:mod:`.fastserve`) and its response, for a handler.

The body is read on demand (``100 Continue`` first when the client waits for it), bounded by
``max_body_bytes`` and ``body_timeout_s``. A whole response goes out in one socket write, a
streamed one in one write per chunk (a held head goes with the first, the end with the last).
Once the body is read, the connection's reader (:mod:`.fastreader`; over TLS a watcher task
per request) reads the socket while the handler works: end of file (the client left) cancels
the handler, and so its engine request; a pipelined next request is kept for after the
response. A response sent before its request's body was read says ``Connection:
close`` unless the body was already buffered whole (then it is read here, without I/O), and so
does one sent while the server drains, or after a body over the limit.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import formatdate

import trio

from . import sockio
from .errors import ApiError, InvalidRequest, PayloadTooLarge
from .fastreader import Reader
from .frontpolicy import FrontLimits
from .http1server import BadRequest, RequestHead, ServerConnection

READ_BYTES = 65536
OWN_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "date", "server"})


class RequestTimeout(ApiError):
    """Raised when a request's body did not arrive within ``body_timeout_s`` (408), with the
    body quart gave it."""

    status = 408

    def __init__(self) -> None:
        super().__init__(
            "The server closed the network connection because the browser didn't finish the "
            "request within the specified time.",
            code=408,
        )


@dataclass(frozen=True)
class FrontRequest:
    """A request's head: ``headers`` has lower-case names, the last value of a repeated one."""

    method: str
    path: str  # without the query
    headers: dict[str, str]


class Exchange:
    """One request and its response, for a handler: read the body, then answer whole
    (:meth:`respond`) or as a stream (:meth:`start`, :meth:`send`, :meth:`end`).

    Args:
        conn: the connection's HTTP state, ``request`` just read from it.
        stream: the connection.
        limits: body size and timeout, pipelined bytes kept.
        request: the request's head.
        closing: the server drains: the response says ``Connection: close``.

    ``nursery`` (set by the server before the handler runs) runs the watcher that cancels
    the handler when the client leaves; ``responded`` and ``peer_gone`` tell the server how
    the exchange ended.
    """

    def __init__(
        self,
        conn: ServerConnection,
        stream: trio.abc.Stream,
        limits: FrontLimits,
        request: RequestHead,
        *,
        closing: bool,
    ) -> None:
        self._conn = conn
        self._stream = stream
        self._limits = limits
        self._closing = closing  # a drain started: the response closes the connection
        self.nursery: trio.Nursery | None = None  # TLS: runs the watcher
        self.reader: Reader | None = None  # plain: the connection's reader, which watches
        self.cancel_scope: trio.CancelScope | None = None  # the handler's (plain: the connection's)
        self.request = FrontRequest(
            method=request.method,
            path=request.target.partition("?")[0],
            headers=request.headers,
        )
        self.responded = False  # a response started
        self.peer_gone = False  # the client closed its side (and the handler was cancelled)
        self._close = False  # the response closes the connection
        self._head = b""  # a streamed response's head, held for its first chunk
        # A plain connection is read and written through sockio (fewer syscalls and switches).
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) else None

    async def read_body(self) -> bytes:
        """The request's whole body.

        Raises:
            PayloadTooLarge: over ``max_body_bytes`` (its Content-Length, or what came).
            RequestTimeout: not all there within ``body_timeout_s``.
            InvalidRequest: malformed (bad chunked encoding, or cut short).
        """
        limits = self._limits
        length = self.request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limits.max_body_bytes:
            self._close = True
            raise PayloadTooLarge(limits.max_body_bytes)
        conn = self._conn
        if conn.expects_continue:
            await self._send_all(conn.continue_bytes())
        chunks: list[bytes] = []
        size = 0
        deadline = trio.current_time() + limits.body_timeout_s
        while True:
            try:
                data = conn.body()
            except BadRequest as exc:
                raise InvalidRequest(f"Malformed request body: {exc}") from exc
            if data is None:
                break
            if data:
                size += len(data)
                if size > limits.max_body_bytes:
                    self._close = True  # the rest is not worth reading
                    raise PayloadTooLarge(limits.max_body_bytes)
                chunks.append(data)
                continue
            with trio.move_on_at(deadline) as scope:  # a timeout only where there is a wait
                if self.reader is not None:
                    await self.reader.more()
                else:
                    conn.feed(bytes(await self._stream.receive_some(READ_BYTES)))
            if scope.cancelled_caught:
                raise RequestTimeout()
        if self.reader is not None:
            self.reader.watch(self)
        else:
            assert self.nursery is not None
            self.nursery.start_soon(self._watch)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def respond(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        """Answer whole, in one write."""
        fields = self._headers(headers)
        self.responded = True
        await self._send_all(self._conn.respond(status, fields, body, close=self._closes()))

    async def start(self, status: int, headers: Mapping[str, str], *, hold: bool = False) -> None:
        """Start a streamed answer (chunked; close-delimited for an HTTP/1.0 client); ``hold``:
        its head goes out with the first chunk (or the end), in one write, not at once."""
        fields = self._headers(headers)
        self.responded = True
        head = self._conn.start(status, fields, close=self._closes())
        if hold:
            self._head = head
        else:
            await self._send_all(head)

    async def send(self, chunk: bytes) -> None:
        """One chunk of a streamed answer, in one write."""
        if chunk:
            data = self._conn.chunk(chunk)
            if self._head:
                data, self._head = self._head + data, b""
            await self._send_all(data)

    async def end(self, chunk: bytes = b"") -> None:
        """End a streamed answer, after its last ``chunk`` (in the same write)."""
        data, self._head = self._head + self._conn.finish(chunk), b""
        await self._send_all(data)

    def _headers(self, headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
        out = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in headers.items()
            if k not in OWN_HEADERS
        ]
        out.extend(server_headers())
        return out

    def _closes(self) -> bool:
        """Whether the response closes the connection (``Connection: close``)."""
        return self._close or self._closing or not self._body_read()

    def _body_read(self) -> bool:
        """Whether the request's body is all read: answering one not read (401, 413) would
        leave its bytes to be parsed as the next request. A body already buffered whole (a
        small one) is read here, without I/O."""
        try:
            while self._conn.body():
                pass  # dropped: the handler answered without it
        except BadRequest:
            return False
        return self._conn.request_complete

    async def _send_all(self, data: bytes) -> None:
        if self._sock is not None:
            await sockio.send_all(self._sock, data)
        else:
            await self._stream.send_all(data)

    def client_left(self) -> None:
        """The client closed its side: cancel the handler (and so its engine request)."""
        self.peer_gone = True
        assert self.cancel_scope is not None
        self.cancel_scope.cancel()

    async def _watch(self) -> None:
        """TLS, while the handler works: end of file cancels it (the client left); a pipelined
        next request is kept for later, up to ``max_header_bytes`` (then reading stops)."""
        limit = self._limits.max_header_bytes
        while True:
            try:
                data = await self._stream.receive_some(READ_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            if not data:
                self.client_left()
                return
            self._conn.feed(bytes(data))
            if self._conn.pending > limit:
                await trio.sleep_forever()


_DATE: list[tuple[int, bytes]] = [(0, b"")]  # (second, its Date header): formatted once a second


def server_headers() -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
    """``date`` and ``server``, as hypercorn sent them (naming itself)."""
    now = int(time.time())
    if _DATE[0][0] != now:
        _DATE[0] = (now, formatdate(now, usegmt=True).encode())
    return (b"date", _DATE[0][1]), (b"server", b"fleet")


__all__ = ["READ_BYTES", "Exchange", "FrontRequest", "RequestTimeout", "server_headers"]
