"""HTTP/1.1 by hand over trio sockets: requests as exact bytes, answers parsed by h11.

The malformed-HTTP scenario sends what no client library would (broken framing, a body
dribbled a byte at a time, a connection dropped mid-body), and the overload burst needs a client
cheap enough to offer 10× a fleet's capacity from the same small machine. Answers are parsed with
h11 (told a request of its own went out, so it reads whatever the server says back).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

from .outcomes import Record, judge

READ_BYTES = 65536


@dataclass(frozen=True)
class Answer:
    """What came back.

    Attributes:
        status: the status, None when no complete status line and headers arrived.
        headers: response headers, names lower-cased.
        body: the body bytes received.
        error: why reading stopped early: empty when the answer was read whole, ``closed``
            when the server closed the connection without an answer.
    """

    status: int | None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: str = ""

    @property
    def dropped(self) -> bool:
        """The server answered nothing and closed (or reset) the connection."""
        return self.status is None

    def json_error(self) -> bool:
        """The body is OpenAI's ``{"error": {...}}``."""
        try:
            data = json.loads(self.body)
        except ValueError:
            return False
        return isinstance(data, dict) and isinstance(data.get("error"), dict)


def address(url: str) -> tuple[str, int]:
    """The host and port of an ``http://`` URL."""
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def request_bytes(
    method: str,
    path: str,
    host: str,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
    *,
    close: bool = True,
) -> bytes:
    """A well-formed HTTP/1.1 request (``content-length`` set unless given)."""
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}"]
    given = {k.lower(): v for k, v in (headers or {}).items()}
    if "content-length" not in given and "transfer-encoding" not in given:
        given["content-length"] = str(len(body))
    given.setdefault("content-type", "application/json")
    if close:
        given["connection"] = "close"
    lines.extend(f"{k}: {v}" for k, v in given.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def json_request(
    path: str, host: str, body: Any, headers: Mapping[str, str] | None = None, close: bool = True
) -> bytes:
    """A POST of ``body`` as JSON."""
    return request_bytes("POST", path, host, json.dumps(body).encode(), headers, close=close)


class Reader:
    """Reads answers off one connection (several in a row on a kept-alive one)."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.conn = h11.Connection(our_role=h11.CLIENT)
        self._pretend()

    def _pretend(self) -> None:
        # h11 reads a response only once it believes its request went out.
        self.conn.send(h11.Request(method="POST", target="/", headers=[("host", "x")]))
        self.conn.send(h11.EndOfMessage())

    async def answer(self) -> Answer:
        """Read the next answer (bounded by the caller's cancel scope).

        Returns:
            The answer; a reset, a close or bad framing ends it early (``error`` says which).
        """
        status: int | None = None
        headers: dict[str, str] = {}
        body = bytearray()
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                return Answer(status, headers, bytes(body), f"bad framing: {exc}")
            if event is h11.NEED_DATA:
                try:
                    data = await self.stream.receive_some(READ_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    return Answer(status, headers, bytes(body), f"reset: {exc}")
                self.conn.receive_data(bytes(data))
                if not data and status is None:
                    return Answer(None, error="closed")
            elif isinstance(event, h11.InformationalResponse):
                continue
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return Answer(status, headers, bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                return Answer(status, headers, bytes(body), "closed mid-answer")

    def next_cycle(self) -> bool:
        """Get ready for the next answer on this connection; False if it cannot be reused."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
            self._pretend()
            return True
        return False


async def exchange(host: str, port: int, data: bytes, timeout_s: float) -> Answer:
    """Connect, send ``data``, read one answer, close.

    Returns:
        The answer; ``error`` is ``connect: ...`` when no connection was made, ``timeout`` when
        none came within ``timeout_s``.
    """
    with trio.move_on_after(timeout_s):
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            return Answer(None, error=f"connect: {exc}")
        return await send_on(stream, data, timeout_s)
    return Answer(None, error="timeout connecting")


async def send_on(stream: trio.SocketStream, data: bytes, timeout_s: float) -> Answer:
    """Send ``data`` on an open connection, read one answer, close the connection."""
    async with stream:
        with trio.move_on_after(timeout_s):
            try:
                await stream.send_all(data)
            except (trio.BrokenResourceError, OSError) as exc:
                # The server may have answered and closed before taking all of it (a 413).
                answer = await Reader(stream).answer()
                return answer if answer.status is not None else Answer(None, error=f"send: {exc}")
            return await Reader(stream).answer()
    return Answer(None, error="timeout")


def record(
    kind: str, start_s: float, answer: Answer, clock: Callable[[], float], *, stream: bool = False
) -> Record:
    """Judge an answer into a load :class:`~fleet.chaos.outcomes.Record`."""
    verdict = judge(answer.status, answer.headers, answer.body, transport_error=answer.error)
    return Record(
        kind=kind,
        stream=stream,
        start_s=start_s,
        end_s=clock(),
        status=answer.status,
        outcome=verdict.outcome,
        detail=verdict.detail,
        pod=answer.headers.get("x-selected-pod", ""),
        no_retry_after=answer.status == 503 and "retry-after" not in answer.headers,
    )


__all__ = [
    "Answer",
    "Reader",
    "address",
    "exchange",
    "json_request",
    "record",
    "request_bytes",
    "send_on",
]
