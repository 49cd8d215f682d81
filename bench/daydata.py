"""The simulated day's load: a recorded rate curve, recorded request sizes, Poisson arrivals.

Sans-I/O apart from reading the two CSV files in ``bench/data/`` (their headers say where
they come from and how they were derived):

* the **rate curve**: requests per second of one production LLM service (ServeGen's
  ``m-large``, Alibaba Cloud Model Studio) every 10 minutes for 14 days;
* the **sizes**: 1,000 (prompt tokens, output tokens) pairs from the Azure LLM inference
  trace 2023 (conversation service).

:func:`make_day` fast-forwards one day of the curve: the day's clock runs ``compression``
times faster than the simulated engines' clock (24 h at ``compression=100`` is 864 s of
simulated time), the rate is scaled so that the day's busiest window offers ``peak_rps``
requests per simulated second, and arrivals are Poisson at the curve's rate (linear between
the windows' midpoints), each request's sizes drawn from the recorded pairs.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
RATES_CSV = DATA / "servegen-m-large-rates.csv"
SIZES_CSV = DATA / "azure-conv-2023-sizes.csv"
WINDOW_S = 600.0  # the curve's resolution (seconds of the day)
DAY_S = 86400.0


@dataclass(frozen=True)
class LoadCurve:
    """Requests per second every ``window_s`` seconds of the day clock, from the trace start.

    Raises:
        ValueError: no windows, a negative or non-finite rate, ``window_s <= 0``.
    """

    rates: tuple[float, ...]
    window_s: float = WINDOW_S

    def __post_init__(self) -> None:
        if not self.rates or not self.window_s > 0:
            raise ValueError("a load curve needs windows and window_s > 0")
        if not all(math.isfinite(r) and r >= 0 for r in self.rates):
            raise ValueError("rates must be finite and >= 0")

    @property
    def days(self) -> int:
        """Whole days the curve covers."""
        return int(len(self.rates) * self.window_s // DAY_S)

    def window(self, t_s: float) -> int:
        """The index of the window holding day-clock time ``t_s`` (from the trace start)."""
        return int(t_s // self.window_s)


@dataclass(frozen=True)
class Arrival:
    """One request: when it arrives (simulated seconds, 0 = the day's start) and its sizes."""

    t: float
    prompt: int
    output: int


@dataclass(frozen=True)
class DayLoad:
    """The arrivals of one fast-forwarded day and how they were made.

    Attributes:
        arrivals: sorted by time; those before 0 belong to the warm-up.
        compression: day-clock seconds per simulated second.
        duration_s: simulated seconds of the measured day (after the warm-up).
        scale: simulated requests per second per recorded request per second.
        window_rps: the simulated rate of each of the day's windows.
    """

    arrivals: tuple[Arrival, ...]
    compression: float
    duration_s: float
    scale: float
    window_rps: tuple[float, ...]

    @property
    def measured(self) -> int:
        """Requests arriving in the measured day."""
        return sum(1 for a in self.arrivals if a.t >= 0)


def load_curve(path: Path = RATES_CSV) -> LoadCurve:
    """Read the rate curve CSV (``window_s,requests_per_s``; ``#`` lines are comments).

    Raises:
        ValueError: windows missing or out of order (names the line).
    """
    rates: list[float] = []
    for row in _rows(path):
        window_s, rate = int(row["window_s"]), float(row["requests_per_s"])
        if window_s != len(rates) * WINDOW_S:
            raise ValueError(f"{path.name}: window {window_s} out of order")
        rates.append(rate)
    return LoadCurve(tuple(rates))


def load_sizes(path: Path = SIZES_CSV) -> tuple[tuple[int, int], ...]:
    """Read the (prompt tokens, output tokens) pairs; zero counts become 1."""
    return tuple(
        (max(1, int(r["prompt_tokens"])), max(1, int(r["output_tokens"]))) for r in _rows(path)
    )


def make_day(
    curve: LoadCurve,
    sizes: Sequence[tuple[int, int]],
    *,
    day: int,
    peak_rps: float,
    compression: float,
    seed: int,
    start_h: float = 0.0,
    hours: float = 24.0,
    warmup_h: float = 0.5,
    max_tokens: int = 16384,
) -> DayLoad:
    """Poisson arrivals for ``hours`` of day ``day`` from ``start_h``, fast-forwarded.

    Args:
        curve: the recorded rates.
        sizes: recorded (prompt, output) pairs to draw from.
        day: which day of the curve (0-based).
        peak_rps: simulated requests per second in the busiest window of the span.
        compression: day-clock seconds per simulated second (>= 1).
        seed: the arrival and size seed (same seed, same requests).
        start_h: where the span starts, hours after the day's midnight.
        hours: how long the measured span is (day-clock hours).
        warmup_h: day-clock hours before the span whose arrivals come first (not measured).
        max_tokens: prompt plus output at most (longer prompts are cut).

    Raises:
        ValueError: a span outside the curve, ``peak_rps <= 0``, ``compression < 1``.
    """
    if not peak_rps > 0 or not compression >= 1 or not hours > 0 or warmup_h < 0:
        raise ValueError("peak_rps and hours must be > 0, compression >= 1, warmup_h >= 0")
    start = day * DAY_S + start_h * 3600
    first = curve.window(start - warmup_h * 3600)
    last = curve.window(start + hours * 3600 - 1e-9)
    if first < 0 or last >= len(curve.rates):
        raise ValueError(f"day {day} from {start_h} h for {hours} h is outside the curve")
    span = curve.rates[curve.window(start) : last + 1]
    scale = peak_rps / max(span) if max(span) > 0 else 0.0
    rng = random.Random(seed)
    arrivals: list[Arrival] = []
    t = (max(first * curve.window_s, start - warmup_h * 3600) - start) / compression
    end = hours * 3600 / compression
    top = max(curve.rates[first : last + 2]) * scale
    while top > 0:  # thinning: candidates at the top rate, kept at rate(t) / top
        t += rng.expovariate(top)
        if t >= end:
            break
        if rng.random() * top > scale * _rate(curve, start + t * compression):
            continue
        prompt, output = sizes[rng.randrange(len(sizes))]
        output = min(output, max_tokens // 2)
        arrivals.append(Arrival(t, min(prompt, max_tokens - output), output))
    return DayLoad(
        arrivals=tuple(arrivals),
        compression=compression,
        duration_s=hours * 3600 / compression,
        scale=scale,
        window_rps=tuple(r * scale for r in span),
    )


def _rate(curve: LoadCurve, t_s: float) -> float:
    """The recorded rate at day-clock ``t_s``: linear between the windows' midpoints."""
    x = t_s / curve.window_s - 0.5
    i = max(0, min(len(curve.rates) - 1, math.floor(x)))
    j = min(len(curve.rates) - 1, i + 1)
    frac = max(0.0, min(1.0, x - i))
    return curve.rates[i] + (curve.rates[j] - curve.rates[i]) * frac


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


__all__ = [
    "DAY_S",
    "RATES_CSV",
    "SIZES_CSV",
    "WINDOW_S",
    "Arrival",
    "DayLoad",
    "LoadCurve",
    "load_curve",
    "load_sizes",
    "make_day",
]
