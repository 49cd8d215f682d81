"""What the gateway (:mod:`.proxy`) puts on its tracing spans: a scheduling decision and an
attempt's outcome, as OpenTelemetry attributes (built only where a span records)."""

from __future__ import annotations

from opentelemetry.trace import Span

from .attempts import CONNECTED, Failed, Refused
from .forwarded import Forwarded
from .router.scheduler import Decision


def decision_attributes(decision: Decision) -> dict[str, str | bool | int | float]:
    """A scheduling decision, as span attributes."""
    out: dict[str, str | bool | int | float] = {
        "fleet.prefix_tokens": decision.prefix_tokens,
        "fleet.scheduling_ms": decision.scheduling_ms,
    }
    if decision.engine is not None:
        out["fleet.engine.id"] = decision.engine.id
    if decision.prefill is not None:
        out["fleet.prefill.engine.id"] = decision.prefill.id
    if decision.pd is not None:
        out["fleet.pd.split"] = decision.pd.split
        out["fleet.pd.reason"] = decision.pd.reason
    return out


def attempt_attributes(span: Span, outcome: object, forwarded: Forwarded | None) -> None:
    """An attempt's outcome, on its span."""
    if forwarded is None:
        span.set_attribute("fleet.attempt.outcome", outcome_name(outcome))
        return
    ok = outcome is CONNECTED
    span.set_attributes(
        {
            "fleet.attempt.outcome": "ok" if ok else "5xx",
            "http.response.status_code": forwarded.status,
        }
    )


def outcome_name(outcome: object) -> str:
    """An attempt's outcome, as ``fleet.attempt.outcome`` says it."""
    if isinstance(outcome, Failed):
        return outcome.reason
    return "refused" if isinstance(outcome, Refused) else "deadline"


__all__ = ["attempt_attributes", "decision_attributes", "outcome_name"]
