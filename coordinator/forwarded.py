"""An engine's response as the coordinator passes it on (:class:`Forwarded`), and what is done
with one: hold a slot until its body is done (:func:`holding`), re-yield it (:func:`relay`), read
what follows a stream's ``[DONE]`` (:func:`read_to_end`). :mod:`.enginecalls` opens them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import trio

from .registry import EngineView

TIMEOUT_HEADER = "x-request-timeout"  # seconds; the engine gets what is left of it
# After a stream's [DONE], the engine's chunked terminator follows at once; wait this long for it
# (so the connection is reused) before closing the connection instead.
END_WAIT_S = 0.5
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "content-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
        "date",
        "server",
    }
)


@dataclass
class Forwarded:
    """An engine's response, opened. Read it once, either way: ``body`` yields its bytes as
    they come, ``read`` returns them whole (what a response that is not a stream needs, with
    no generator to step); both release the engine at the end."""

    status: int
    headers: dict[str, str]
    body: AsyncIterator[bytes]
    engine: EngineView
    discard: Callable[[], Awaitable[None]]  # close it unread (the engine is released)
    read: Callable[[], Awaitable[bytes]]  # the whole body (raises BadGateway if it broke)
    # ``body`` for a reader whose own cancel scope bounds each wait (no read timer per read);
    # take one of the two, once.
    timed_body: Callable[[], AsyncIterator[bytes]]
    # Whether the body's first piece came with the head (reading it needs no wait).
    buffered: Callable[[], bool] = lambda: False
    # Whether its next piece (or its end) is here, taking what the socket holds (no wait).
    ready: Callable[[], bool] = lambda: False
    # Ends the body at once (its connection shut down): a stream's wait found stalled.
    abort: Callable[[], None] = lambda: None


async def relay(
    body: AsyncIterator[bytes], then: Callable[[], Awaitable[object]] | None = None
) -> AsyncIterator[bytes]:
    """Re-yield ``body``; when done, or abandoned (the client left), close it, then ``then()``."""
    try:
        async for chunk in body:
            yield chunk
    finally:
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            await aclose()
        if then is not None:
            await then()


def holding(forwarded: Forwarded, release: Callable[[], Awaitable[object]]) -> Forwarded:
    """``forwarded``, calling ``release`` (idempotent) once its body is done, read or
    discarded (an admission slot held until then)."""
    inner_discard, inner_read = forwarded.discard, forwarded.read

    async def discard() -> None:
        try:
            await inner_discard()
        finally:
            await release()

    async def read() -> bytes:
        try:
            return await inner_read()
        finally:
            await release()

    forwarded.body = relay(forwarded.body, then=release)
    forwarded.discard = discard
    forwarded.read = read
    return forwarded


async def read_to_end(
    body: AsyncIterator[bytes], ready: Callable[[], bool] = lambda: False
) -> None:
    """Read what follows a stream's ``[DONE]`` (its chunked terminator), for at most
    ``END_WAIT_S``: a body read to its end keeps its engine connection for the next request,
    where one closed before it would close the connection. Anything more is dropped. No timer
    while ``ready()`` says the rest is here (the terminator mostly comes with ``[DONE]``)."""
    while ready():
        try:
            await body.__anext__()
        except StopAsyncIteration:
            return
    with trio.move_on_after(END_WAIT_S):
        async for _ in body:
            pass


def is_sse(forwarded: Forwarded) -> bool:
    """Is the response a server-sent event stream?"""
    return forwarded.headers.get("content-type", "").startswith("text/event-stream")


__all__ = [
    "END_WAIT_S",
    "HOP_BY_HOP",
    "TIMEOUT_HEADER",
    "Forwarded",
    "holding",
    "is_sse",
    "read_to_end",
    "relay",
]
