"""The KPA-style autoscaler (fleet.coordinator.autoscale): plain calls with explicit ``now``."""

from __future__ import annotations

import pytest

from fleet.coordinator.autoscale import AutoscaleConfig, Autoscaler
from fleet.protocol.errors import ConfigError

CFG = AutoscaleConfig(target_per_engine=10, stable_window_s=60, panic_window_s=6,
                      panic_threshold=2, scale_to_zero_after_s=300)  # fmt: skip


def feed(scaler: Autoscaler, start: float, end: float, demand: float, step: float = 1.0) -> float:
    """Observe ``demand`` every ``step`` seconds from ``start`` to ``end``; return ``end``."""
    t = start
    while t <= end:
        scaler.observe(t, demand)
        t += step
    return end


def test_a_request_waiting_for_a_deployment_with_no_engine_gets_one_at_once() -> None:
    scaler = Autoscaler(CFG, min_replicas=0, max_replicas=4, now=0.0)
    assert scaler.decide(1.0, 0).replicas == 0  # nothing asked: nothing runs
    scaler.observe(2.0, 1)  # one request queued
    decision = scaler.decide(2.0, 0)
    assert (decision.replicas, decision.mode) == (1, "from-zero")


def test_steady_demand_sets_the_count_by_the_stable_mean() -> None:
    scaler = Autoscaler(CFG, min_replicas=1, max_replicas=10, now=0.0)
    now = feed(scaler, 0, 120, 35)
    decision = scaler.decide(now, 4)
    assert (decision.replicas, decision.mode) == (4, "stable")  # ceil(35 / 10)
    now = feed(scaler, 121, 240, 12)
    assert scaler.decide(now, 4).replicas == 2


def test_a_burst_panics_up_at_once_and_does_not_drop_back_before_the_window() -> None:
    scaler = Autoscaler(CFG, min_replicas=1, max_replicas=20, now=0.0)
    now = feed(scaler, 0, 60, 10)
    assert scaler.decide(now, 1).replicas == 1
    now = feed(scaler, 61, 66, 80)  # 6 s at 8x: the short mean needs 8 engines
    decision = scaler.decide(now, 1)
    assert (decision.replicas, decision.mode) == (8, "panic")
    now = feed(scaler, 67, 80, 5)  # the burst is over; panic holds the count
    assert scaler.decide(now, 8).replicas == 8
    now = feed(scaler, 81, 200, 5)  # a stable window later: back to what the mean needs
    decision = scaler.decide(now, 8)
    assert (decision.replicas, decision.mode) == (1, "stable")


def test_an_idle_deployment_keeps_one_engine_then_scales_to_zero() -> None:
    scaler = Autoscaler(CFG, min_replicas=0, max_replicas=4, now=0.0)
    now = feed(scaler, 0, 30, 10)
    now = feed(scaler, 31, 200, 0)
    decision = scaler.decide(now, 1)
    assert (decision.replicas, decision.mode) == (1, "idle")  # demand 170 s ago
    now = feed(scaler, 201, 331, 0)
    decision = scaler.decide(now, 1)
    assert (decision.replicas, decision.mode) == (0, "to-zero")  # idle 301 s
    floor = Autoscaler(CFG, min_replicas=1, max_replicas=4, now=0.0)
    assert floor.decide(feed(floor, 0, 400, 0), 1).replicas == 1  # never under minReplicas


def test_the_count_stays_within_min_and_max() -> None:
    scaler = Autoscaler(CFG, min_replicas=2, max_replicas=3, now=0.0)
    assert scaler.decide(feed(scaler, 0, 100, 500), 3).replicas == 3
    assert scaler.decide(feed(scaler, 101, 300, 0), 3).replicas == 2
    with pytest.raises(ConfigError, match="minReplicas"):
        Autoscaler(CFG, min_replicas=3, max_replicas=2, now=0.0)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"target_per_engine": 0}, "target_per_engine"),
        ({"stable_window_s": 0}, "stable_window_s"),
        ({"panic_window_s": 120}, "panic_window_s"),
        ({"panic_threshold": 0.5}, "panic_threshold"),
        ({"scale_to_zero_after_s": -1}, "scale_to_zero_after_s"),
    ],
)
def test_bad_settings_name_the_key(changes: dict[str, float], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        AutoscaleConfig(**changes)
