"""The simulated day (bench/simday.py): its load, its fleet simulation, its verdicts."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from fleet.bench.daydata import (
    CONTEXT_TOKENS,
    OUTPUT_CAP,
    OUTPUT_MEDIAN,
    PROMPT_MEDIAN,
    SIZE_SAMPLES,
    LoadCurve,
    diurnal_shape,
    make_day,
    synthetic_curve,
    synthetic_sizes,
)
from fleet.bench.dayfleet import DaySim, FleetConfig
from fleet.bench.dayslo import Slo, evaluate
from fleet.bench.daytiers import CostAwarePolicy, FixedPolicy, compressed
from fleet.bench.simday import PRICES, ROOM, SPEEDS, autoscaled, cheapest_fixed, make_tiers
from fleet.coordinator.autoscale import AutoscaleConfig

SIZES = ((1000, 200), (200, 50), (3000, 400), (400, 100))


def test_the_synthetic_curve_has_its_documented_shape() -> None:
    curve = synthetic_curve(seed=1)
    assert curve == synthetic_curve(seed=1) and curve != synthetic_curve(seed=2)
    assert curve.days == 3 and len(curve.rates) == 3 * 144
    day = curve.rates[144:288]
    at = {h: sum(day[h * 6 : h * 6 + 6]) / 6 for h in range(24)}  # hourly means

    assert 0.2 <= min(day) / max(day) <= 0.3  # the night trough: about a quarter of the peak
    assert 1.7 <= max(day) / (sum(day) / len(day)) <= 1.95  # peak to mean about 1.8
    assert at[3] < at[6] < at[8] < at[10]  # the morning ramp
    assert max(at[h] for h in range(11, 18)) < 1.1 * min(at[h] for h in range(11, 18))  # plateau
    assert at[20] > 1.2 * at[14] and at[20] > at[17]  # a second, higher evening peak
    assert max(range(24), key=at.__getitem__) in (20, 21)
    # the noise is small: every window within 10% of the noise-free shape
    for i, rate in enumerate(day):
        shape = diurnal_shape((i + 0.5) / 6) / max(diurnal_shape((j + 0.5) / 6) for j in range(144))
        assert rate == pytest.approx(shape, rel=0.1)
    with pytest.raises(ValueError, match="days"):
        synthetic_curve(seed=1, days=0)


def test_the_synthetic_sizes_are_seeded_lognormals_within_the_context() -> None:
    sizes = synthetic_sizes(seed=1)
    assert sizes == synthetic_sizes(seed=1) and sizes != synthetic_sizes(seed=2)
    assert len(sizes) == SIZE_SAMPLES
    prompts, outputs = sorted(p for p, _ in sizes), sorted(o for _, o in sizes)
    assert statistics.median(prompts) == pytest.approx(PROMPT_MEDIAN, rel=0.05)
    assert statistics.median(outputs) == pytest.approx(OUTPUT_MEDIAN, rel=0.05)
    assert prompts[-len(prompts) // 100] > 5 * PROMPT_MEDIAN  # a long tail
    assert all(1 <= o <= OUTPUT_CAP and 1 <= p <= CONTEXT_TOKENS - o for p, o in sizes)
    with pytest.raises(ValueError, match="count"):
        synthetic_sizes(seed=1, count=0)


def test_a_day_is_seeded_scaled_to_its_peak_and_compressed() -> None:
    curve, sizes = synthetic_curve(seed=1), synthetic_sizes(seed=1)
    a = make_day(curve, sizes, day=1, peak_rps=20, compression=200, seed=3, hours=6)
    assert a == make_day(curve, sizes, day=1, peak_rps=20, compression=200, seed=3, hours=6)
    assert a != make_day(curve, sizes, day=1, peak_rps=20, compression=200, seed=4, hours=6)
    assert max(a.window_rps) == pytest.approx(20)
    assert a.duration_s == pytest.approx(6 * 3600 / 200)
    expected = sum(a.window_rps) * 600 / 200
    assert a.measured == pytest.approx(expected, rel=0.1)
    assert a.arrivals[0].t < 0 <= a.arrivals[-1].t < a.duration_s  # warm-up first
    with pytest.raises(ValueError, match="outside the curve"):
        make_day(curve, sizes, day=3, peak_rps=20, compression=200, seed=3)
    with pytest.raises(ValueError, match="outside the curve"):  # no warm-up before day 0
        make_day(curve, sizes, day=0, peak_rps=20, compression=200, seed=3)


def trough() -> LoadCurve:
    """One day: 100 req/s until 02:00, then 10 req/s (measured from 01:00: one busy hour, two
    quiet ones)."""
    return LoadCurve(tuple([100.0] * 12 + [10.0] * 132))


def test_autoscaling_spends_less_through_a_trough_at_equal_slo() -> None:
    tiers = make_tiers(PRICES, SPEEDS, ROOM)
    load = {"peak_rps": 8, "compression": 100, "seed": 1}
    day = make_day(trough(), SIZES, day=0, start_h=1, hours=3, **load)
    busy = make_day(trough(), SIZES, day=0, start_h=1, hours=1, **load)
    cfg, slo = FleetConfig(compression=100), Slo()
    mix, fixed = cheapest_fixed(tiers, cfg, slo, day, busy)
    scaled = autoscaled(tiers, tiers, cfg, slo, day, (6, 8), mix)
    for figures in (fixed, scaled):
        assert figures["slo"]["served"] == day.measured and figures["slo"]["failed"] == 0
        assert figures["slo"]["met"]
    assert scaled["dollars"] < 0.85 * fixed["dollars"]
    # scaled down in the trough: fewer engines at the end than at the peak
    peak = sum(scaled["peak_engines"].values())
    assert sum(scaled["timeline"][-1][1].values()) < peak


def test_a_fixed_fleet_bills_every_engine_for_the_whole_day() -> None:
    tiers = make_tiers(PRICES, SPEEDS, ROOM)
    day = make_day(trough(), SIZES, day=0, start_h=1, hours=2, peak_rps=2, compression=100, seed=1)
    result = DaySim(
        tiers,
        FleetConfig(compression=100),
        FixedPolicy({"a100": 2, "l40s": 1}),
        day.arrivals,
        duration_s=day.duration_s,
        initial={"a100": 2, "l40s": 1},
    ).run()
    assert result.engine_hours == pytest.approx({"h100": 0.0, "a100": 4.0, "l40s": 2.0})
    assert result.dollars == pytest.approx(2 * 2 * 1.59 + 2 * 1.09)
    assert len(result.served) == day.measured and result.failed == 0


def test_from_zero_the_first_request_waits_one_cold_start() -> None:
    tiers = make_tiers(PRICES, SPEEDS, ROOM)
    day = make_day(
        trough(), SIZES, day=0, start_h=3, hours=1, warmup_h=0, peak_rps=0.5, compression=10, seed=2
    )
    cfg = FleetConfig(compression=10, cold_start_day_s=60)
    policy = CostAwarePolicy(
        compressed(AutoscaleConfig(target_per_engine=4), 10), tiers, start_units=0, now=0.0
    )
    result = DaySim(tiers, cfg, policy, day.arrivals, duration_s=day.duration_s, initial={}).run()
    assert len(result.served) == day.measured and result.failed == 0
    first = min(result.served, key=lambda s: s.arrival)
    assert first.ttft >= 60 / 10  # the compressed cold start
    assert result.engine_hours["l40s"] > 0 and result.engine_hours["h100"] == 0  # cheapest fit


def test_requests_fail_when_no_engine_comes_within_the_deadline() -> None:
    tiers = make_tiers(PRICES, SPEEDS, ROOM)
    day = make_day(trough(), SIZES, day=0, start_h=3, hours=1, peak_rps=1, compression=100, seed=1)
    cfg = FleetConfig(compression=100, deadline_s=5)
    result = DaySim(tiers, cfg, FixedPolicy({}), day.arrivals, duration_s=day.duration_s,
                    initial={}).run()  # fmt: skip
    assert result.failed == day.measured and not result.served and result.dollars == 0
    assert not evaluate(result, Slo(), compression=100)["met"]


def test_tiers_need_a_price_a_speed_and_a_room() -> None:
    with pytest.raises(ValueError, match="l4"):
        make_tiers("h100=3,l4=1", "h100=8", "h100=1,l4=1")
    with pytest.raises(ValueError, match="whole numbers"):
        make_tiers("h100=3", "h100=2.5", "h100=1")
    tiers = make_tiers(PRICES, SPEEDS, ROOM)
    assert {t.name: t.slow_factor for t in tiers} == {"h100": 1.0, "a100": 1.6, "l40s": 4.0}


def test_simday_writes_json_and_markdown(tmp_path: Path) -> None:
    from fleet.bench.cli import main

    main(["simday", "--hours", "1", "--start-h", "3", "--peak-rps", "4", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "simday" / "result.json").read_text())
    assert set(result["scenarios"]) == {"fixed", "autoscaled", "fixed-h100", "autoscaled-h100"}
    for figures in result["scenarios"].values():
        assert figures["slo"]["served"] == result["load"]["requests"]
        assert figures["slo"]["failed"] == 0
    assert result["scenarios"]["fixed"]["slo"]["met"]
    assert result["scenarios"]["fixed"]["vs_fixed"] == 1.0
    assert "synthetic" in result["load"]["curve"] and "synthetic" in result["load"]["sizes"]
    md = (tmp_path / "simday" / "result.md").read_text()
    assert "| fixed |" in md and "Synthetic day" in md
