"""The simulated day's load: a synthetic rate curve, synthetic request sizes, Poisson arrivals.

Sans-I/O and generated in code, deterministically from a seed: no third-party trace is
committed to this repository, so the day is invented rather than recorded. Its shape and its
sizes are chosen to resemble what published production LLM traces look like, not taken from
any of them:

* the **rate curve** (:func:`synthetic_curve`): every 10 minutes, a night trough about a
  quarter of the peak, a morning ramp, a midday plateau and a higher evening peak (peak to
  mean about 1.8), times small seeded noise; the same shape every day;
* the **sizes** (:func:`synthetic_sizes`): (prompt tokens, output tokens) pairs from seeded
  lognormal distributions (medians about 1,000 and 200 tokens, long tails, capped).

:func:`make_day` fast-forwards one day of the curve: the day's clock runs ``compression``
times faster than the simulated engines' clock (24 h at ``compression=100`` is 864 s of
simulated time), the rate is scaled so that the day's busiest window offers ``peak_rps``
requests per simulated second, and arrivals are Poisson at the curve's rate (linear between
the windows' midpoints), each request's sizes drawn from the pairs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

WINDOW_S = 600.0  # the curve's resolution (seconds of the day)
DAY_S = 86400.0

# The synthetic diurnal shape, in units of its noise-free peak (hours are of the day clock).
# Invented to resemble the published shape of production LLM traffic (peak to mean about 1.8,
# night trough about a quarter of the peak), not fitted to or taken from any trace.
TROUGH = 0.25  # the night floor
PLATEAU = 0.68  # the daytime plateau above which the evening peak rises
PLATEAU_CENTRE_H = 14.5  # the plateau's middle; its edges (ramps) are PLATEAU_HALF_H either side
PLATEAU_HALF_H = 7.0  # morning ramp around 07:30, evening fall around 21:30
PLATEAU_FLATNESS = 4  # exponent of the super-Gaussian plateau: higher, flatter top, steeper ramps
EVENING_H = 20.5  # the evening peak
EVENING_SD_H = 1.3  # its width (standard deviation)
EVENING_LIFT = 0.45  # its height above the plateau's edge, before normalising to the peak
NOISE = 0.02  # relative standard deviation of each window's seeded noise

# Synthetic request sizes: lognormal token counts, invented (not drawn from any trace).
PROMPT_MEDIAN = 1000  # prompt tokens
PROMPT_SIGMA = 0.8  # of log(tokens): mean about 1,400 tokens, 1 in 100 above about 6,400
OUTPUT_MEDIAN = 200  # output tokens
OUTPUT_SIGMA = 0.6  # mean about 240 tokens, 1 in 100 above about 800
CONTEXT_TOKENS = 16384  # prompt plus output at most (the prompt's tail is capped here)
OUTPUT_CAP = 2048  # output tokens at most
SIZE_SAMPLES = 10_000  # pairs drawn per seed


@dataclass(frozen=True)
class LoadCurve:
    """The rate (requests per second, or relative) every ``window_s`` seconds of the day clock,
    from the curve's first midnight (day N starts at N * 86400 s).

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
        """The index of the window holding day-clock time ``t_s`` (from the first midnight)."""
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
        scale: simulated requests per second per unit of the curve's rate.
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


def diurnal_shape(hour: float) -> float:
    """The noise-free rate at ``hour`` of the day (any real; 24-periodic), before scaling."""
    plateau = math.exp(
        -((_hours_apart(hour, PLATEAU_CENTRE_H) / PLATEAU_HALF_H) ** PLATEAU_FLATNESS)
    )
    evening = math.exp(-0.5 * (_hours_apart(hour, EVENING_H) / EVENING_SD_H) ** 2)
    return TROUGH + (PLATEAU - TROUGH) * plateau + EVENING_LIFT * evening


def synthetic_curve(seed: int, days: int = 3) -> LoadCurve:
    """``days`` days of the synthetic diurnal curve, 10-minute windows, its noise seeded.

    Rates are relative (the noise-free peak is 1.0); :func:`make_day` scales them.

    Raises:
        ValueError: ``days < 1``.
    """
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    rng = random.Random(f"simday-curve-{seed}")
    per_day = int(DAY_S // WINDOW_S)
    hours = [(i + 0.5) * WINDOW_S / 3600 for i in range(per_day)]
    peak = max(diurnal_shape(h) for h in hours)
    rates = [
        diurnal_shape(hours[i % per_day]) / peak * max(0.0, 1 + NOISE * rng.gauss(0, 1))
        for i in range(days * per_day)
    ]
    return LoadCurve(tuple(rates))


def synthetic_sizes(seed: int, count: int = SIZE_SAMPLES) -> tuple[tuple[int, int], ...]:
    """``count`` (prompt tokens, output tokens) pairs from the seeded lognormal distributions.

    Each count is at least 1; outputs are capped at ``OUTPUT_CAP`` and prompts at
    ``CONTEXT_TOKENS`` less the output.

    Raises:
        ValueError: ``count < 1``.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    rng = random.Random(f"simday-sizes-{seed}")
    pairs = []
    for _ in range(count):
        output = min(
            OUTPUT_CAP, max(1, round(rng.lognormvariate(math.log(OUTPUT_MEDIAN), OUTPUT_SIGMA)))
        )
        prompt = round(rng.lognormvariate(math.log(PROMPT_MEDIAN), PROMPT_SIGMA))
        pairs.append((min(CONTEXT_TOKENS - output, max(1, prompt)), output))
    return tuple(pairs)


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
        curve: the rates (e.g. :func:`synthetic_curve`).
        sizes: (prompt, output) pairs to draw from (e.g. :func:`synthetic_sizes`).
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
    """The curve's rate at day-clock ``t_s``: linear between the windows' midpoints."""
    x = t_s / curve.window_s - 0.5
    i = max(0, min(len(curve.rates) - 1, math.floor(x)))
    j = min(len(curve.rates) - 1, i + 1)
    frac = max(0.0, min(1.0, x - i))
    return curve.rates[i] + (curve.rates[j] - curve.rates[i]) * frac


def _hours_apart(a: float, b: float) -> float:
    """The distance between two hours of the day, around the clock (0 to 12)."""
    d = abs(a - b) % 24
    return min(d, 24 - d)


__all__ = [
    "DAY_S",
    "WINDOW_S",
    "Arrival",
    "DayLoad",
    "LoadCurve",
    "diurnal_shape",
    "make_day",
    "synthetic_curve",
    "synthetic_sizes",
]
