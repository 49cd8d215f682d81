"""OpenTelemetry tracing of inference requests; off unless an OTLP endpoint is configured.

On (:func:`configure` with ``--otel-endpoint`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``), each request
makes this tree (names; ``fleet.*`` attributes)::

    POST /v1/chat/completions   server span: http.*, gen_ai.request.model, fleet.request_id;
    │                           continues the client's W3C traceparent; ends with the body
    ├── fleet.admission         fleet.queued, fleet.queue_wait_s, fleet.priority
    ├── fleet.schedule          one per try: fleet.engine.id, fleet.prefix_tokens, fleet.pd
    ├── fleet.attempt           one per try: fleet.engine.id, fleet.attempt.retry,
    │   │                       fleet.attempt.outcome (ok, 5xx, refused, timeout, ...);
    │   │                       ends when the try's outcome is known (response head or error)
    │   ├── fleet.prefill       a P/D split's prefill (fleet.engine.id, fleet.pd.outcome)
    │   └── fleet.engine_call   client span: the HTTP exchange with the engine, from the request
    │                           to the end of its body (so it may end after its attempt); the
    │                           engine gets its context as ``traceparent``/``tracestate``
    └── fleet.resume            a broken stream continued: fleet.engine.id (the failed one),
        └── fleet.engine_call   fleet.resume.outcome (the engine continuing it, or why none)

Off, :func:`span` and :func:`start` cost a global lookup: they hand out OpenTelemetry's
non-recording span, and no header is added (a client's ``traceparent`` passes through).

The request's span is made current around the code that serves it (:func:`within`), including
each step of a streamed body (:func:`spanning`), so children nest under it whichever task reads
the body. Spans are never held current across a ``yield``.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from fleet.logjson import REQUEST_ID
from fleet.protocol.errors import ConfigError

Attributes = Mapping[str, str | bool | int | float]

_W3C = TraceContextTextMapPropagator()
_OFF: AbstractContextManager[trace.Span] = contextlib.nullcontext(trace.INVALID_SPAN)
_tracer: trace.Tracer | None = None


def install(provider: trace.TracerProvider | None) -> None:
    """Trace with ``provider`` from now on (None: tracing off)."""
    global _tracer
    _tracer = None if provider is None else provider.get_tracer("fleet.coordinator")


def enabled() -> bool:
    """Whether spans are recorded."""
    return _tracer is not None


def configure(endpoint: str | None) -> Any:
    """Turn tracing on when ``endpoint`` (``--otel-endpoint``, an OTLP/HTTP base URL such as
    ``http://collector:4318``) or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set; the SDK's
    ``TracerProvider`` (shut it down at exit: it flushes) or None (off).

    The exporter is OTLP over HTTP/protobuf, or gRPC with ``OTEL_EXPORTER_OTLP_PROTOCOL=grpc``;
    the SDK's other ``OTEL_*`` variables (headers, service name, sampler) apply.

    Raises:
        ConfigError: the URL is not http(s), or the ``tracing`` extra is not installed.
    """
    if not endpoint and not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return None
    if endpoint and urlsplit(endpoint).scheme not in ("http", "https"):
        raise ConfigError("--otel-endpoint", endpoint, "not an http(s) URL")
    grpc = os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").startswith("grpc")
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if grpc:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[assignment]
                OTLPSpanExporter,
            )
    except ImportError as exc:
        why = f"needs the `tracing` extra (pip install 'fleet-serving[tracing]'): {exc}"
        raise ConfigError("--otel-endpoint", endpoint, why) from exc
    if endpoint and not grpc and not urlsplit(endpoint).path.rstrip("/").endswith("/v1/traces"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"  # as the SDK does with the variable
    name = os.environ.get("OTEL_SERVICE_NAME", "fleet-coordinator")
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    exporter = OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    install(provider)
    return provider


def span(
    name: str, attributes: Attributes | None = None, kind: SpanKind = SpanKind.INTERNAL
) -> AbstractContextManager[trace.Span]:
    """A child of the current span, current while inside; an exception escaping it is
    recorded and sets its status to error."""
    if _tracer is None:
        return _OFF
    return _tracer.start_as_current_span(name, kind=kind, attributes=attributes)


def start(
    name: str,
    attributes: Attributes | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    parent: otel_context.Context | None = None,
) -> trace.Span:
    """A span that is not made current and ends where its work ends (:func:`ender`); a child
    of ``parent`` (a context, default the current one)."""
    if _tracer is None:
        return trace.INVALID_SPAN
    return _tracer.start_span(name, context=parent, kind=kind, attributes=attributes)


def ender(span_: trace.Span) -> Callable[[], None]:
    """Ends ``span_`` once, however many times it is called."""
    ended = False

    def end() -> None:
        nonlocal ended
        if not ended:
            ended = True
            span_.end()

    return end


def extract(headers: Mapping[str, str]) -> otel_context.Context | None:
    """The context of a client's W3C ``traceparent``/``tracestate`` (None when off)."""
    if _tracer is None:
        return None
    return _W3C.extract(headers)


def inject(headers: dict[str, str], span_: trace.Span) -> dict[str, str]:
    """``headers`` with ``span_``'s W3C trace context (the same dict when it has none: tracing
    is off). A span not sampled is passed on too, flagged so."""
    if not span_.get_span_context().is_valid:
        return headers
    out = dict(headers)
    _W3C.inject(out, context=trace.set_span_in_context(span_))
    return out


def new_request_id() -> str:
    """A request id for a request that came without ``x-request-id``: ``fleet-`` and 32 hex
    digits, as a uuid4 gave (128 random bits; unique, not unguessable: no system call per
    request; the module's generator, which is reseeded in a forked child)."""
    return f"fleet-{random.getrandbits(128):032x}"


@contextlib.contextmanager
def within(span_: trace.Span, request_id: str) -> Iterator[None]:
    """While inside, ``span_`` is the current span and log lines carry ``request_id``."""
    rid = REQUEST_ID.set(request_id)
    valid = span_.get_span_context().is_valid
    token = otel_context.attach(trace.set_span_in_context(span_)) if valid else None
    try:
        yield
    finally:
        if token is not None:
            otel_context.detach(token)
        REQUEST_ID.reset(rid)


def finish(span_: trace.Span, status: int) -> None:
    """End a request's span with its HTTP status (a 5xx is an error, per the conventions)."""
    if span_.is_recording():
        span_.set_attribute("http.response.status_code", status)
        if status >= 500:
            span_.set_status(Status(StatusCode.ERROR))
        span_.end()


async def spanning(
    stream: AsyncIterator[bytes], span_: trace.Span, request_id: str, status: int
) -> AsyncIterator[bytes]:
    """Re-yield ``stream``, each chunk made :func:`within` the request's span; then, or when
    abandoned, close it and :func:`finish` the span. (Inlined: it runs once per chunk.)"""
    ctx = trace.set_span_in_context(span_) if span_.get_span_context().is_valid else None
    try:
        while True:
            rid = REQUEST_ID.set(request_id)
            token = otel_context.attach(ctx) if ctx is not None else None
            try:
                chunk = await stream.__anext__()
            except StopAsyncIteration:
                return
            finally:
                if token is not None:
                    otel_context.detach(token)
                REQUEST_ID.reset(rid)
            yield chunk
    finally:
        try:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                with within(span_, request_id):
                    await aclose()
        finally:
            finish(span_, status)


__all__ = [
    "configure",
    "enabled",
    "ender",
    "extract",
    "finish",
    "inject",
    "install",
    "new_request_id",
    "span",
    "spanning",
    "start",
    "within",
]
