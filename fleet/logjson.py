"""Log lines as JSON (``--log-format json``), carrying the request and trace they belong to.

Each line is one JSON object: ``time`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``,
``message``, and when known ``request_id`` (the request being served: :data:`REQUEST_ID`),
``trace_id`` and ``span_id`` (the current OpenTelemetry span, when tracing is on), ``exc``
(a traceback). :class:`RequestContext` adds the same fields to every record, so a text format
may name them too.
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from datetime import UTC, datetime

from opentelemetry import trace

# The request a task is serving (set by the coordinator's inference routes).
REQUEST_ID: ContextVar[str | None] = ContextVar("fleet_request_id", default=None)
FORMATS = ("text", "json")


class RequestContext(logging.Filter):
    """Adds ``request_id``, ``trace_id`` and ``span_id`` (None when unknown) to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id = trace.format_trace_id(ctx.trace_id)
            record.span_id = trace.format_span_id(ctx.span_id)
        else:
            record.trace_id = record.span_id = None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module's docstring); needs :class:`RequestContext`
    on the handler for the request fields."""

    def format(self, record: logging.LogRecord) -> str:
        at = datetime.fromtimestamp(record.created, UTC)
        line: dict[str, object] = {
            "time": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "trace_id", "span_id"):
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def formatter(name: str) -> logging.Formatter:
    """The formatter ``--log-format`` names.

    Raises:
        ValueError: ``name`` is not one of :data:`FORMATS`.
    """
    if name == "json":
        return JsonFormatter()
    if name == "text":
        return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise ValueError(f"--log-format must be one of {', '.join(FORMATS)}, got {name!r}")


__all__ = ["FORMATS", "REQUEST_ID", "JsonFormatter", "RequestContext", "formatter"]
