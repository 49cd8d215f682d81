"""A simulated day: $ spent by a cost-aware autoscaled fleet against a fixed-size one, same SLO.

One synthetic day of load (``bench/daydata.py``: a diurnal rate curve and lognormal request
sizes generated from ``--seed``; synthetic because no third-party trace is committed to the
repository), fast-forwarded ``--compression`` times, served by simulated engines on priced
GPU tiers (``bench/dayfleet.py``), the same arrivals (same seed) for every scenario:

* ``fixed``: the cheapest fixed fleet that meets the SLO all day, found by search (the
  fewest units whose cheapest mix meets it in the busiest hour, then checked on the day);
* ``autoscaled``: Fleet's KPA autoscaler and ``cheapest_mix`` over every tier, with the
  largest target (requests per unit, searched in ``--targets``) whose day meets the SLO;
* ``fixed-TIER`` and ``autoscaled-TIER``: the same on one tier only (``--single-tier``), to
  show what the mix adds.

Output: ``bench/results/simday/result.json`` and ``result.md`` (the table below).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fleet.coordinator.autoscale import AutoscaleConfig
from fleet.coordinator.costmix import TierOption, cheapest_mix, parse_speeds
from fleet.coordinator.costs import parse_prices

from . import report
from .daydata import (
    OUTPUT_MEDIAN,
    PROMPT_MEDIAN,
    DayLoad,
    make_day,
    synthetic_curve,
    synthetic_sizes,
)
from .dayfleet import DayResult, DaySim, FleetConfig
from .dayslo import Slo, evaluate
from .daytiers import (
    CostAwarePolicy,
    FixedPolicy,
    Policy,
    Tier,
    compressed,
    price_of,
    slow_factors,
    units_of,
)

# RunPod Secure Cloud on-demand list prices, $/GPU-hour (runpod.io/pricing, as transcribed on
# 2026-09-25 in github.com/tgarg01/silybench-data derived/csv/gpu_prices.csv): H100 SXM 80GB,
# A100 SXM 80GB, L40S 48GB.
PRICES = "h100=3.49,a100=1.59,l40s=1.09"
# Units per engine in proportion to memory bandwidth (decode-bound): 3.35, 2.04, 0.86 TB/s.
SPEEDS = "h100=8,a100=5,l40s=2"
ROOM = "h100=12,a100=12,l40s=12"
# The simulated day is day 1 of a three-day synthetic curve: day 0 feeds the warm-up before
# midnight, day 2 a span past the next midnight.
DAY = 1


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--start-h", type=float, default=0.0, help="hour the span starts")
    p.add_argument("--hours", type=float, default=24.0, help="hours simulated")
    p.add_argument("--peak-rps", type=float, default=40.0, help="simulated req/s at the peak")
    p.add_argument("--compression", type=float, default=100.0, help="day s per simulated s")
    p.add_argument("--cold-start-s", type=float, default=45.0, help="day-clock seconds")
    p.add_argument("--seed", type=int, default=1, help="the curve, the sizes, the arrivals")
    p.add_argument("--gpu-prices", default=PRICES, help="TIER=$/GPU-hour (%(default)s)")
    p.add_argument("--tier-speeds", default=SPEEDS, help="TIER=units per engine (%(default)s)")
    p.add_argument("--tier-room", default=ROOM, help="TIER=GPUs available (%(default)s)")
    p.add_argument("--targets", default="4:16", help="LOW:HIGH requests per unit to search")
    p.add_argument("--single-tier", default="h100", help="the one tier of autoscaled-TIER")
    p.add_argument("--scenarios", default="fixed,autoscaled,fixed-TIER,autoscaled-TIER")
    p.add_argument("--slo-ttft-s", type=float, default=2.0)
    p.add_argument("--slo-tpot-ms", type=float, default=100.0)
    p.add_argument("--slo-quantile", type=float, default=95.0)


def run(args: argparse.Namespace, out: Path | None = None) -> dict[str, Any]:
    """Run the scenarios, write the results, return them."""
    wall0 = time.monotonic()
    tiers = make_tiers(args.gpu_prices, args.tier_speeds, args.tier_room)
    slo = Slo(args.slo_ttft_s, args.slo_tpot_ms / 1000, args.slo_quantile)
    cfg = FleetConfig(compression=args.compression, cold_start_day_s=args.cold_start_s)
    curve, sizes = synthetic_curve(args.seed), synthetic_sizes(args.seed)
    common = {"peak_rps": args.peak_rps, "compression": args.compression, "seed": args.seed}
    day = make_day(curve, sizes, day=DAY, start_h=args.start_h, hours=args.hours, **common)
    peak_w = max(range(len(day.window_rps)), key=day.window_rps.__getitem__)
    peak_h = args.start_h + peak_w / 6
    busy_h = min(max(args.start_h, peak_h - 0.5), args.start_h + args.hours - min(1.0, args.hours))
    busiest = make_day(curve, sizes, day=DAY, start_h=busy_h, hours=min(1.0, args.hours), **common)
    wanted = args.scenarios.replace("TIER", args.single_tier).split(",")
    single = [t for t in tiers if t.name == args.single_tier]
    low, _, high = args.targets.partition(":")
    targets = (int(low), int(high or low))

    scenarios: dict[str, dict[str, Any]] = {}
    fixed_mix, scenarios["fixed"] = cheapest_fixed(tiers, cfg, slo, day, busiest)
    for name in wanted:
        subset = single if name.endswith(f"-{args.single_tier}") else tiers
        if name.startswith("fixed-"):
            scenarios[name] = cheapest_fixed(subset, cfg, slo, day, busiest)[1]
        elif name.startswith("autoscaled"):
            scenarios[name] = autoscaled(subset, tiers, cfg, slo, day, targets, fixed_mix)
    base = scenarios["fixed"]["dollars"]
    for s in scenarios.values():
        s["vs_fixed"] = round(s["dollars"] / base, 3) if base else None
    result: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k not in ("run", "out")},
        "load": {
            "curve": "synthetic diurnal curve from the seed, 10-minute windows (no trace)",
            "sizes": (
                f"synthetic lognormal, medians {PROMPT_MEDIAN} prompt / {OUTPUT_MEDIAN} "
                "output tokens (no trace)"
            ),
            "requests": day.measured,
            "duration_simulated_s": round(day.duration_s, 1),
            "peak_rps": args.peak_rps,
            "mean_rps": round(sum(day.window_rps) / len(day.window_rps), 2),
            "busiest_hour_from_h": round(busy_h, 2),
        },
        "tiers": [vars(t) for t in tiers],
        "slo": vars(slo),
        "scenarios": scenarios,
        "wall_s": round(time.monotonic() - wall0, 1),
    }
    md = markdown(result)
    folder = report.write("simday", result, md, out=out)
    print(md)
    print(f"\nwritten to {folder}")
    return result


def make_tiers(prices: str, speeds: str, room: str) -> list[Tier]:
    """Tiers from ``--gpu-prices``, ``--tier-speeds`` and ``--tier-room``.

    Raises:
        ValueError: a tier without a speed or room, a speed or room that is not a whole number.
    """
    price = parse_prices(prices)
    speed = parse_speeds(speeds)
    gpus = parse_prices(room, flag="--tier-room")
    for name, value in [*speed.items(), *gpus.items()]:
        if value != int(value):
            raise ValueError(f"tier {name}: speeds and room are whole numbers, got {value}")
    missing = set(price) ^ set(speed) | set(price) ^ set(gpus)
    if missing:
        raise ValueError(f"tiers {sorted(missing)} need a price, a speed and a room")
    slow = slow_factors(speed)
    return [Tier(n, int(speed[n]), price[n], slow[n], int(gpus[n])) for n in price]


def simulate(
    tiers: Sequence[Tier], cfg: FleetConfig, policy: Policy, day: DayLoad, initial: dict[str, int]
) -> DayResult:
    """One day (or span) of ``day``'s arrivals."""
    sim = DaySim(tiers, cfg, policy, day.arrivals, duration_s=day.duration_s, initial=initial)
    return sim.run()


def cheapest_fixed(
    tiers: Sequence[Tier], cfg: FleetConfig, slo: Slo, day: DayLoad, busiest: DayLoad
) -> tuple[dict[str, int], dict[str, Any]]:
    """The fewest units whose cheapest mix meets ``slo`` in the busiest hour (binary search),
    raised until it meets it all day; that mix and its scenario figures."""
    options = [TierOption(t.name, t.speed, t.price, t.room) for t in tiers]
    max_engines = sum(t.room for t in tiers)
    attempts: list[dict[str, Any]] = []

    def mix(units: int) -> dict[str, int]:
        return cheapest_mix(units, options, max_engines)

    seen: dict[tuple[str, tuple[tuple[str, int], ...]], tuple[bool, DayResult]] = {}

    def passes(units: int, load: DayLoad, span: str) -> tuple[bool, DayResult]:
        m = mix(units)
        key = (span, tuple(sorted(m.items())))
        if key not in seen:  # several unit counts can share one mix
            r = simulate(tiers, cfg, FixedPolicy(m), load, m)
            met = bool(evaluate(r, slo, compression=cfg.compression)["met"])
            attempts.append({"span": span, "mix": m, "units": units_of(m, tiers), "met": met})
            seen[key] = met, r
        return seen[key]

    lo, hi = 0, units_of(mix(10**6), tiers)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if passes(mid, busiest, "busiest hour")[0] else (mid, hi)
    units = hi
    t0 = time.monotonic()
    met, result = passes(units, day, "day")
    while not met and units_of(mix(units), tiers) < units_of(mix(10**6), tiers):
        units = units_of(mix(units), tiers) + 1
        t0 = time.monotonic()
        met, result = passes(units, day, "day")
    chosen = mix(units)
    figures = _figures(result, slo, cfg, time.monotonic() - t0)
    return chosen, {"mix": chosen, "price_per_hour": round(price_of(chosen, tiers), 2),
                    **figures, "search": attempts}  # fmt: skip


def autoscaled(
    subset: Sequence[Tier],
    tiers: Sequence[Tier],
    cfg: FleetConfig,
    slo: Slo,
    day: DayLoad,
    targets: tuple[int, int],
    start_mix: dict[str, int],
) -> dict[str, Any]:
    """The autoscaled fleet on ``subset`` with the largest target (requests per unit, a whole
    number in ``targets``, found by binary search) that meets ``slo``; with none, the
    smallest (``met`` false). It starts the warm-up with as many units as ``start_mix``."""
    attempts: list[dict[str, Any]] = []
    runs: dict[int, dict[str, Any]] = {}
    lo, hi = targets
    best: int | None = None
    while lo <= hi:
        target = (lo + hi) // 2
        t0 = time.monotonic()
        units = units_of(start_mix, tiers)
        first = day.arrivals[0].t if day.arrivals else 0.0
        policy = CostAwarePolicy(
            compressed(AutoscaleConfig(target_per_engine=target), cfg.compression),
            subset,
            start_units=units,
            now=first,
        )
        result = simulate(subset, cfg, policy, day, policy.mix(units))
        figures = {"target_per_unit": target, **_figures(result, slo, cfg, time.monotonic() - t0)}
        figures["peak_engines"] = _peak(result)
        figures["mix_changes"] = result.decisions
        runs[target] = figures
        met = bool(figures["slo"]["met"])
        attempts.append({"target_per_unit": target, "dollars": figures["dollars"], "met": met})
        lo, hi, best = (target + 1, hi, target) if met else (lo, target - 1, best)
    chosen = runs[best] if best is not None else runs[min(runs)]
    return {**chosen, "tiers": [t.name for t in subset], "attempts": attempts}


def _figures(result: DayResult, slo: Slo, cfg: FleetConfig, wall_s: float) -> dict[str, Any]:
    return {
        "dollars": round(result.dollars, 2),
        "engine_hours": {n: round(h, 2) for n, h in result.engine_hours.items()},
        "slo": evaluate(result, slo, compression=cfg.compression),
        "timeline": [(round(t * cfg.compression / 3600, 3), c) for t, c in result.timeline],
        "wall_s": round(wall_s, 1),
    }


def _peak(result: DayResult) -> dict[str, int]:
    peak: dict[str, int] = {}
    for _, counts in result.timeline:
        for name, n in counts.items():
            peak[name] = max(peak.get(name, 0), n)
    return peak


def markdown(result: dict[str, Any]) -> str:
    """The result as the table ``bench/README.md`` quotes."""
    cfg, load, slo = result["config"], result["load"], result["slo"]
    q = f"p{slo['quantile']:g}"
    names = [t["name"] for t in result["tiers"]]
    rows = []
    for name, s in result["scenarios"].items():
        how = (
            " + ".join(f"{n}×{c}" for n, c in s["mix"].items())
            if "mix" in s
            else f"target {s['target_per_unit']:g}/unit"
        )
        f = s["slo"]
        rows.append([
            name, how, s["dollars"], s["vs_fixed"],
            " / ".join(f"{s['engine_hours'].get(n, 0.0):.1f}" for n in names),
            f"{f['ttft_p50_ms']:.0f} / {f[f'ttft_{q}_ms']:.0f}",
            f"{f['tpot_p50_ms']:.0f} / {f[f'tpot_{q}_ms']:.0f}",
            f"{f[f'worst_hour_ttft_{q}_ms']:.0f} / {f[f'worst_hour_tpot_{q}_ms']:.0f}",
            f["within_slo_pct"], f"{f['served']} / {f['failed']}", "yes" if f["met"] else "NO",
        ])  # fmt: skip
    head = (
        f"### Synthetic day ({cfg['hours']:g} h from {cfg['start_h']:g} h), "
        f"compressed {cfg['compression']:g}× ({load['duration_simulated_s']:g} simulated s), "
        f"{load['requests']} requests, peak {load['peak_rps']:g} / mean {load['mean_rps']:g} "
        f"req/s (simulated)\n\n"
        f"Load: {load['curve']}; sizes: {load['sizes']}. SLO: {q} TTFT ≤ {slo['ttft_s']:g} s "
        f"and {q} TPOT ≤ {slo['tpot_s'] * 1000:g} ms over the day and in every hour, none "
        f"failed. Prices $/GPU-h: "
        + ", ".join(f"{t['name']} {t['price']:g} ({t['speed']} units)" for t in result["tiers"])
        + ".\n\n"
    )
    columns = ["scenario", "fleet", "$ / day", "$ vs fixed", "engine-hours " + "/".join(names),
               f"TTFT p50/{q} ms", f"TPOT p50/{q} ms", f"worst hour TTFT/TPOT {q} ms",
               "% within SLO", "served / failed", "SLO met"]  # fmt: skip
    return head + report.table(columns, rows)


__all__ = ["add_args", "autoscaled", "cheapest_fixed", "make_tiers", "markdown", "run"]
