"""The OpenAI inference routes (``POST /v1/completions``, ``POST /v1/chat/completions``): one
implementation, served by the front server (:mod:`.fastserve`) and, for a connection that
hypercorn serves (one whose earlier request went to another route), by the quart app
(:mod:`.api`).

A request: its API key is checked and its rate limit spent before its body is read; the body is
validated (:mod:`.validation`), then the gateway (:mod:`.proxy`) admits, routes and opens the
engine's response. Every error leaves through :func:`error_reply` (OpenAI's ``{"error": ...}``
body, its status, ``Retry-After``), counted by reason.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Protocol

import trio
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind

from fleet.logjson import REQUEST_ID

from . import tracing
from .apikeys import ApiKey, ApiKeys, RateLimited
from .errors import ApiError, error_body, render
from .fastexchange import Exchange, FrontRequest
from .forwarded import is_sse
from .metrics import CoordinatorMetrics
from .proxy import Gateway
from .sharedlimits import SharedLimits, retry_after_s
from .validation import ParsedRequest, RequestKind, validate

log = logging.getLogger(__name__)

_DONE_TAIL = b"data: [DONE]"  # a stream's last event (then its blank line)

ENDPOINTS: dict[str, RequestKind] = {
    "/v1/completions": "completion",
    "/v1/chat/completions": "chat",
}


@dataclass
class Reply:
    """An engine's answer for the client: whole (``body``) or a stream (``stream``)."""

    status: int
    headers: dict[str, str]
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    request_id: str = ""  # the request's x-request-id (set by :func:`inference`)
    # Whether the stream's first piece came with the engine's head (no wait to read it).
    buffered: Callable[[], bool] = lambda: False
    # Lets go of the engine (and the request's slot) where ``stream`` is never read.
    discard: Callable[[], Awaitable[None]] | None = None


class GuardedStream:
    """A reply's stream for its consumer (the front server, or quart): closing it lets go of
    the engine even before its first read, where an async generator closed unstarted runs no
    ``finally`` (every wrapper of the engine's body is one) and would keep the engine's
    in-flight count, its connection and the request's admission slot forever.

    Args:
        stream: the reply's stream.
        discard: lets go of the engine; called once, only if no piece was asked for.
    """

    __slots__ = ("_discard", "_stream")

    def __init__(
        self, stream: AsyncIterator[bytes], discard: Callable[[], Awaitable[None]] | None
    ) -> None:
        self._stream = stream
        self._discard = discard

    def __aiter__(self) -> GuardedStream:
        return self

    async def __anext__(self) -> bytes:
        self._discard = None  # the stream's own finally lets go from here
        return await self._stream.__anext__()

    async def aclose(self) -> None:
        discard, self._discard = self._discard, None
        try:
            if discard is not None:
                await discard()
        finally:
            aclose = getattr(self._stream, "aclose", None)
            if aclose is not None:
                await aclose()


Forward = Callable[[ParsedRequest, bytes], Awaitable[Reply]]


class CachedReplies(Protocol):
    """A response cache in front of the engines (:class:`.respcacheflow.CachedInference`)."""

    async def serve(
        self, parsed: ParsedRequest, raw: bytes, headers: dict[str, str], forward: Forward
    ) -> Reply:
        """A cached reply to ``parsed``, or ``forward``'s (kept where it may be)."""
        ...


@dataclass(frozen=True)
class InferencePorts:
    """What the inference routes use of the coordinator, and nothing more (built once, by
    :class:`~.service.Coordinator`).

    Attributes:
        api_keys: the clients' keys (empty: the API is open).
        limits: the fleet-wide rate limits.
        metrics: the coordinator's metrics (requests, errors, rate limiting).
        context_len: a model's context length (None: unknown), for validation.
        gateway: admits, routes and opens the engine's response.
        response_cache: answers repeated deterministic requests (None: off).
    """

    api_keys: ApiKeys
    limits: SharedLimits
    metrics: CoordinatorMetrics
    context_len: Callable[[str], int | None]
    gateway: Gateway
    response_cache: CachedReplies | None = None


async def authorize(
    ports: InferencePorts, headers: dict[str, str], *, spend: bool = True
) -> ApiKey | None:
    """The request's API key (None when the API is open), its rate limit spent (``spend``).

    Raises:
        Unauthorized: no key, or an unknown one.
        RateLimited: the key is over its rate limit.
    """
    key = ports.api_keys.check(headers)
    if key is None or not spend:
        return key
    wait_s = await ports.limits.take(key, trio.current_time())  # the fleet's bucket
    if wait_s > 0:
        ports.metrics.rate_limited.labels(key=key.name).inc()
        raise RateLimited(key.name, retry_after_s(wait_s))
    return key


async def inference(
    ports: InferencePorts,
    path: str,
    headers: dict[str, str],
    read_body: Callable[[], Awaitable[bytes]],
    *,
    in_task: bool = False,
) -> Reply:
    """Serve an inference request to ``path`` (one of :data:`ENDPOINTS`); ``headers`` with
    lower-case names; ``read_body`` reads its body (after the key is checked).

    The request gets an ``x-request-id`` (the client's, or a new one) that its log lines carry,
    and, with tracing on, a server span that ends with its body (:mod:`.tracing`). ``in_task``:
    the caller reads a streamed reply in this task, with :data:`~fleet.logjson.REQUEST_ID` set
    to ``reply.request_id`` (as :class:`InferenceRoutes` does); with tracing off its stream is
    then returned as the gateway gave it, without a wrapper per chunk.

    Raises:
        ApiError: the request is refused (invalid, unauthorized, over a limit, no engine).
    """
    request_id = headers.get("x-request-id") or tracing.new_request_id()
    headers = {**headers, "x-request-id": request_id}
    if not tracing.enabled():
        rid = REQUEST_ID.set(request_id)
        try:
            reply = await _inference(ports, path, headers, read_body, INVALID_SPAN)
        finally:
            REQUEST_ID.reset(rid)
        reply.request_id = request_id
        if reply.stream is not None and not in_task:  # its log lines carry the request id
            reply.stream = tracing.spanning(reply.stream, INVALID_SPAN, request_id, reply.status)
        return reply
    span = tracing.start(
        f"POST {path}",
        {"http.request.method": "POST", "http.route": path, "fleet.request_id": request_id},
        kind=SpanKind.SERVER,
        parent=tracing.extract(headers),
    )
    try:
        with tracing.within(span, request_id):
            reply = await _inference(ports, path, headers, read_body, span)
    except BaseException as exc:
        tracing.finish(span, exc.status if isinstance(exc, ApiError) else 500)
        raise
    reply.request_id = request_id
    if reply.stream is None:
        tracing.finish(span, reply.status)
    else:
        reply.stream = tracing.spanning(reply.stream, span, request_id, reply.status)
    return reply


async def _inference(
    ports: InferencePorts,
    path: str,
    headers: dict[str, str],
    read_body: Callable[[], Awaitable[bytes]],
    span: Span,
) -> Reply:
    key = await authorize(ports, headers)  # before the body is read
    raw = await read_body()
    parsed = validate(ENDPOINTS[path], raw, context_len_of=ports.context_len)
    if span.is_recording():
        span.set_attributes({"gen_ai.request.model": parsed.model, "fleet.stream": parsed.stream})
    tier = key.tier if key is not None else None
    forward = functools.partial(_forward, ports.gateway, path, headers, tier)
    if ports.response_cache is None:
        reply = await forward(parsed, raw)
    else:  # respcacheflow.py: a hit, or forwarded and kept
        reply = await ports.response_cache.serve(parsed, raw, headers, forward)
    ports.metrics.answered(path, parsed.model, reply.status)
    return reply


async def _forward(
    gateway: Gateway, path: str, headers: dict[str, str], tier: int | None,
    parsed: ParsedRequest, raw: bytes,
) -> Reply:  # fmt: skip
    """Route ``parsed`` (body ``raw``) to an engine; its reply."""
    fwd = await gateway.forward(path, parsed, raw, headers, tier=tier)
    if is_sse(fwd):
        return Reply(
            fwd.status, fwd.headers, stream=fwd.body, buffered=fwd.buffered, discard=fwd.discard
        )
    return Reply(fwd.status, fwd.headers, body=await fwd.read())


def error_reply(metrics: CoordinatorMetrics, err: ApiError) -> tuple[bytes, int, dict[str, str]]:
    """Body, status and headers answering ``err``, counted under its code (or status)."""
    metrics.request_errors.labels(reason=str(err.code or err.status)).inc()
    return render(err)


def internal_error(metrics: CoordinatorMetrics) -> tuple[bytes, int, dict[str, str]]:
    """Body, status and headers answering an unexpected error (logged by the caller)."""
    metrics.request_errors.labels(reason="internal").inc()
    body = error_body("Internal error in the coordinator.", type="server_error", code=500)
    return body, 500, {"content-type": "application/json"}


class InferenceRoutes:
    """The front server's handler (:class:`.httpserve.FrontRoutes`) for :data:`ENDPOINTS`.

    Args:
        ports: what the routes use of the coordinator.
    """

    paths = frozenset(p.encode() for p in ENDPOINTS)

    def __init__(self, ports: InferencePorts) -> None:
        self.ports = ports

    async def __call__(self, request: FrontRequest, exchange: Exchange) -> None:
        try:
            reply = await inference(
                self.ports, request.path, request.headers, exchange.read_body, in_task=True
            )
        except ApiError as err:
            await exchange.respond(*_swap(error_reply(self.ports.metrics, err)))
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise  # the client left while its body was read
        except Exception:
            log.exception("unhandled error serving POST %s", request.path)
            await exchange.respond(*_swap(internal_error(self.ports.metrics)))
            return
        if reply.stream is None:
            await exchange.respond(reply.status, reply.headers, reply.body)
            return
        rid = REQUEST_ID.set(reply.request_id)  # the stream's log lines carry it (in_task)
        last = b""  # a piece ending in [DONE]: it goes out with the stream's end
        try:
            # Closed however this ends (the client left: the engine's request is closed too).
            async with aclosing(GuardedStream(reply.stream, reply.discard)) as stream:
                # The head waits for the first piece only where that piece is already here.
                await exchange.start(reply.status, reply.headers, hold=reply.buffered())
                async for chunk in stream:
                    if last:
                        await exchange.send(last)
                        last = b""
                    if _DONE_TAIL in chunk[-len(_DONE_TAIL) - 4 :]:
                        last = chunk  # the stream's last piece, in all likelihood
                    else:
                        await exchange.send(chunk)
        finally:
            REQUEST_ID.reset(rid)
        await exchange.end(last)


def _swap(reply: tuple[bytes, int, dict[str, str]]) -> tuple[int, dict[str, str], bytes]:
    body, status, headers = reply
    return status, headers, body


__all__ = [
    "ENDPOINTS",
    "CachedReplies",
    "Forward",
    "GuardedStream",
    "InferencePorts",
    "InferenceRoutes",
    "Reply",
    "authorize",
    "error_reply",
    "inference",
    "internal_error",
]
