"""The headers of a routed request (:mod:`.proxy`): the deadline its client asks for
(``x-request-timeout``), which of its headers go on to the engine, and what its response
says of the routing decision. Plain functions of dicts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from .errors import InvalidRequest
from .forwarded import TIMEOUT_HEADER
from .pdsplit import PREFILL_POD_HEADER
from .registry import EngineView
from .router.scheduler import Decision

# Headers worth passing to the engine; everything else (host, cookies, auth) stays here.
FORWARD_HEADERS = ("content-type", "accept", "x-request-id", "traceparent", "tracestate")


def timeout_of(headers: Mapping[str, str], default: float | None) -> float | None:
    """The request's deadline in seconds: ``x-request-timeout``, else ``default``.

    Raises:
        InvalidRequest: the header is not a positive number of seconds.
    """
    raw = headers.get(TIMEOUT_HEADER)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise InvalidRequest(
            f"`{TIMEOUT_HEADER}` must be a positive number of seconds, got {raw!r}.",
            param=TIMEOUT_HEADER,
        )
    return value


def upstream_headers(headers: Mapping[str, str], request_id: str) -> dict[str, str]:
    """What goes to the engine: :data:`FORWARD_HEADERS` of the client's, its request id, and
    a JSON content type unless the client named one."""
    out = {k: v for k, v in headers.items() if k in FORWARD_HEADERS}
    out["x-request-id"] = request_id
    out.setdefault("content-type", "application/json")
    return out


def decision_headers(
    headers: dict[str, str], decision: Decision, prefill: EngineView | None
) -> None:
    """Add what the response tells of the decision: the prefill engine of a split
    (``x-prefill-pod``), the cached prefix and the scheduling time."""
    if prefill is not None:
        headers[PREFILL_POD_HEADER] = prefill.id
    headers["x-cache-prefix-length"] = str(decision.prefix_tokens)
    headers["x-scheduling-time-ms"] = f"{decision.scheduling_ms:.3f}"


__all__ = ["FORWARD_HEADERS", "decision_headers", "timeout_of", "upstream_headers"]
