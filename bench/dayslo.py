"""Whether a simulated day met its latency objective, and by how much.

The objective (:class:`Slo`): the ``quantile`` of time to first token (arrival at the fleet
to the first token, admission-queue wait included) and of time per output token (vLLM's
TPOT: first to last token over the tokens after the first) stay within bounds over the whole
day *and in every hour of it* (so that a fleet cannot meet it by being fast at night and slow
at the peak), with no request failed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .dayfleet import DayResult, Served
from .stats import percentile


@dataclass(frozen=True)
class Slo:
    """Latency bounds at a percentile.

    Raises:
        ValueError: a bound <= 0 or a quantile outside (0, 100].
    """

    ttft_s: float = 2.0
    tpot_s: float = 0.1
    quantile: float = 95.0

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tpot_s > 0 and 0 < self.quantile <= 100):
            raise ValueError("SLO bounds must be > 0 and the quantile in (0, 100]")

    def holds(self, served: Sequence[Served]) -> bool:
        """Whether these requests meet both bounds at the quantile (True for none)."""
        if not served:
            return True
        ttft, tpot = _split(served)
        return percentile(ttft, self.quantile) <= self.ttft_s and (
            not tpot or percentile(tpot, self.quantile) <= self.tpot_s
        )


def evaluate(result: DayResult, slo: Slo, *, compression: float) -> dict[str, Any]:
    """The day's latency figures (milliseconds), per-hour worst case and whether it met ``slo``.

    Hours are day-clock hours: a request's hour is its arrival time times ``compression``.
    """
    served = result.served
    ttft, tpot = _split(served)
    q = slo.quantile
    within = sum(
        1 for s in served if s.ttft <= slo.ttft_s and (s.tpot is None or s.tpot <= slo.tpot_s)
    )
    hours: dict[int, list[Served]] = defaultdict(list)
    for s in served:
        hours[int(s.arrival * compression // 3600)].append(s)
    per_hour = {h: _split(v) for h, v in sorted(hours.items())}
    worst_ttft = max((percentile(t, q) for t, _ in per_hour.values() if t), default=math.nan)
    worst_tpot = max((percentile(p, q) for _, p in per_hour.values() if p), default=math.nan)
    missed = [h for h, v in sorted(hours.items()) if not slo.holds(v)]
    return {
        "served": len(served),
        "failed": result.failed,
        "ttft_p50_ms": _ms(percentile(ttft, 50)),
        f"ttft_p{q:g}_ms": _ms(percentile(ttft, q)),
        "tpot_p50_ms": _ms(percentile(tpot, 50)),
        f"tpot_p{q:g}_ms": _ms(percentile(tpot, q)),
        f"worst_hour_ttft_p{q:g}_ms": _ms(worst_ttft),
        f"worst_hour_tpot_p{q:g}_ms": _ms(worst_tpot),
        "within_slo_pct": round(100 * within / len(served), 2) if served else 0.0,
        "hours_missed": missed,
        "met": result.failed == 0 and slo.holds(served) and not missed,
    }


def _split(served: Sequence[Served]) -> tuple[list[float], list[float]]:
    return [s.ttft for s in served], [s.tpot for s in served if s.tpot is not None]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1) if math.isfinite(seconds) else math.nan


__all__ = ["Slo", "evaluate"]
