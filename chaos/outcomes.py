"""What happened to each request, judged from what the client received: sans-I/O.

Four outcomes, from the client's point of view:

=============  ================================================================================
succeeded      2xx with a complete body: a JSON object with ``choices``; for a stream, every SSE
               ``data:`` event is JSON, at least one carries ``choices``, and the stream ends
               with ``data: [DONE]``
failed         a clear error: 4xx/5xx with an OpenAI-style JSON ``{"error": ...}`` body, or a
               stream whose last JSON event is ``{"error": ...}`` followed by ``[DONE]``
lost           no answer at all: connection refused or reset, or the client's timeout, before a
               status line arrived
broken         an answer that started and is not whole or not well-formed: a stream without
               ``[DONE]``, a malformed SSE event, a 2xx body that is not a JSON completion, an
               error status without a JSON error body
=============  ================================================================================

A 503 must carry ``Retry-After``; one without it is still ``failed`` but counted apart
(:attr:`Record.no_retry_after`).
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from fleet.bench.stats import percentile


class Outcome(enum.StrEnum):
    """A request's outcome (see the module docstring)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    LOST = "lost"
    BROKEN = "broken"


@dataclass(frozen=True)
class Verdict:
    """An outcome and why (empty for a success)."""

    outcome: Outcome
    detail: str = ""


def judge(
    status: int | None,
    headers: dict[str, str],
    body: bytes,
    *,
    transport_error: str = "",
) -> Verdict:
    """Judge one answer.

    Args:
        status: the HTTP status, or None when no status line arrived.
        headers: response headers, names lower-cased.
        body: every body byte received.
        transport_error: why reading stopped early (empty when the body was read to its end).

    Returns:
        The verdict.
    """
    if status is None:
        return Verdict(Outcome.LOST, transport_error or "no response")
    if headers.get("content-type", "").startswith("text/event-stream"):
        return judge_stream(status, body, transport_error=transport_error)
    if transport_error:
        return Verdict(Outcome.BROKEN, f"{status} body cut: {transport_error}")
    data = _json_object(body)
    if 200 <= status < 300:
        if data is None or not isinstance(data.get("choices"), list):
            return Verdict(Outcome.BROKEN, f"{status} without a JSON completion: {body[:80]!r}")
        return Verdict(Outcome.SUCCEEDED)
    if status >= 400 and data is not None and isinstance(data.get("error"), dict):
        return Verdict(Outcome.FAILED, f"{status} {_error_text(data)}")
    return Verdict(Outcome.BROKEN, f"{status} without a JSON error body: {body[:80]!r}")


def judge_stream(status: int, body: bytes, *, transport_error: str = "") -> Verdict:
    """Judge a ``text/event-stream`` answer (see the module docstring)."""
    events = sse_data(body)
    done = False
    last: dict[str, Any] | None = None
    chunks = 0
    for data in events:
        if done:
            return Verdict(Outcome.BROKEN, "event after [DONE]")
        if data == "[DONE]":
            done = True
            continue
        try:
            parsed = json.loads(data)
        except ValueError:
            return Verdict(Outcome.BROKEN, f"malformed event {data[:80]!r}")
        if not isinstance(parsed, dict):
            return Verdict(Outcome.BROKEN, f"event is not an object: {data[:80]!r}")
        last = parsed
        chunks += isinstance(parsed.get("choices"), list)
    if not done or transport_error:
        why = transport_error or "ended without [DONE]"
        return Verdict(Outcome.BROKEN, f"stream cut after {len(events)} events: {why}")
    if last is not None and isinstance(last.get("error"), dict):
        return Verdict(Outcome.FAILED, f"{status} in-stream {_error_text(last)}")
    if not 200 <= status < 300 or not chunks:
        return Verdict(Outcome.BROKEN, f"{status} stream with no completion chunk")
    return Verdict(Outcome.SUCCEEDED)


def sse_data(body: bytes) -> list[str]:
    """The ``data`` of each complete SSE event in ``body`` (a trailing partial event is left out).

    Events are separated by a blank line; an event's ``data:`` lines are joined with newlines;
    comments (``:``) and other fields are ignored.
    """
    text = body.decode("utf-8", errors="replace").replace("\r\n", "\n")
    blocks = text.split("\n\n")
    out = []
    for block in blocks[:-1]:  # the last piece has no blank line after it: incomplete
        lines = [line[5:].removeprefix(" ") for line in block.split("\n") if line[:5] == "data:"]
        if lines:
            out.append("\n".join(lines))
    return out


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _error_text(data: dict[str, Any]) -> str:
    error = data["error"]
    return f"{error.get('type') or error.get('code')}: {str(error.get('message'))[:120]}"


@dataclass(frozen=True)
class Record:
    """One request as the load generator saw it.

    Attributes:
        kind: ``completion`` or ``chat``.
        stream: whether it asked for a stream.
        start_s: when it was sent (seconds, on the run's clock).
        end_s: when its answer ended (or it gave up).
        status: HTTP status, None when none arrived.
        outcome: the verdict's outcome.
        detail: the verdict's detail.
        pod: the engine that served it (``x-selected-pod``), empty when unknown.
        no_retry_after: a 503 without a ``Retry-After`` header.
    """

    kind: str
    stream: bool
    start_s: float
    end_s: float
    status: int | None
    outcome: Outcome
    detail: str = ""
    pod: str = ""
    no_retry_after: bool = False

    @property
    def latency_s(self) -> float:
        return self.end_s - self.start_s


def figures(records: Sequence[Record]) -> dict[str, Any]:
    """The counts and latencies of a set of requests.

    Returns:
        ``sent``, one count per outcome, ``rejected_503``, ``rejected_503_no_retry_after``,
        ``p50_ms`` and ``p99_ms`` (of succeeded requests; None without any), and up to five
        example details per non-success outcome (``examples``).
    """
    counts = {o.value: 0 for o in Outcome}
    examples: dict[str, list[str]] = {}
    for r in records:
        counts[r.outcome.value] += 1
        if r.outcome is not Outcome.SUCCEEDED and r.detail:
            seen = examples.setdefault(r.outcome.value, [])
            if len(seen) < 5 and r.detail not in seen:
                seen.append(r.detail)
    ok_ms = [r.latency_s * 1000 for r in records if r.outcome is Outcome.SUCCEEDED]
    return {
        "sent": len(records),
        **counts,
        "rejected_503": sum(r.status == 503 for r in records),
        "rejected_503_no_retry_after": sum(r.no_retry_after for r in records),
        "p50_ms": _round(percentile(ok_ms, 50)),
        "p99_ms": _round(percentile(ok_ms, 99)),
        "examples": examples,
    }


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 1)


# -- when did the fleet notice ---------------------------------------------------------------


@dataclass(frozen=True)
class EngineSample:
    """One look at an engine from outside (``/api/v1/engines`` and ``/metrics``).

    Attributes:
        t: when (seconds, on the run's clock).
        state: its registry state; ``absent`` when the registry does not list it.
        pid: its process id (0 while none).
        breaker: ``fleet_breaker_state`` (0 closed, 1 half-open, 2 open; 0 when not exported).
    """

    t: float
    state: str
    pid: int = 0
    breaker: int = 0

    @property
    def routed(self) -> bool:
        """Whether the coordinator may send it requests: ready, breaker not open."""
        return self.state == "ready" and self.breaker != 2


def first_time(
    samples: Iterable[EngineSample], when: Callable[[EngineSample], bool]
) -> float | None:
    """The time of the first sample for which ``when`` holds; None if there is none."""
    for s in samples:
        if when(s):
            return s.t
    return None


def since(t: float | None, origin: float) -> float | None:
    """``t - origin`` rounded to milliseconds, or None when ``t`` is None."""
    return None if t is None else round(t - origin, 3)


__all__ = [
    "EngineSample",
    "Outcome",
    "Record",
    "Verdict",
    "figures",
    "first_time",
    "judge",
    "judge_stream",
    "since",
    "sse_data",
]
