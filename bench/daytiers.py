"""GPU tiers and who decides how many engines of each a simulated fleet runs: sans-I/O.

A :class:`Tier` is worth ``speed`` units per engine (one unit holds the autoscaler's
``target_per_engine`` requests) and runs the simulator's steps ``slow_factor`` times slower
than its H100 model. :class:`FixedPolicy` keeps the same engines all day;
:class:`CostAwarePolicy` is Fleet's own pair: the KPA :class:`~fleet.coordinator.autoscale.
Autoscaler` decides units, :func:`~fleet.coordinator.costmix.cheapest_mix` turns them into
engines per tier.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from fleet.coordinator.autoscale import AutoscaleConfig, Autoscaler
from fleet.coordinator.costmix import TierOption, cheapest_mix


@dataclass(frozen=True)
class Tier:
    """A GPU tier: ``speed`` units per engine, ``price`` $/hour per engine, ``room`` GPUs."""

    name: str
    speed: int
    price: float
    slow_factor: float
    room: int


class Policy(Protocol):
    """Decides the engines per tier a fleet should run."""

    def wanted(self, now: float, demand: float) -> dict[str, int]:
        """Engines per tier to run now, given ``demand`` (requests in flight + queued)."""
        ...


class FixedPolicy:
    """The same engines all day."""

    def __init__(self, mix: Mapping[str, int]) -> None:
        self.mix = dict(mix)

    def wanted(self, now: float, demand: float) -> dict[str, int]:
        return self.mix


class CostAwarePolicy:
    """Fleet's KPA (:class:`~fleet.coordinator.autoscale.Autoscaler`) decides units, and
    :func:`~fleet.coordinator.costmix.cheapest_mix` turns them into engines per tier."""

    def __init__(
        self, cfg: AutoscaleConfig, tiers: Sequence[Tier], *, start_units: int, now: float
    ) -> None:
        self.options = [TierOption(t.name, t.speed, t.price, t.room) for t in tiers]
        self.max_engines = sum(t.room for t in tiers)
        high = sum(t.speed * t.room for t in tiers)
        self.scaler = Autoscaler(cfg, min_replicas=0, max_replicas=high, now=now)
        self.units = start_units
        self._mixes: dict[int, dict[str, int]] = {}

    def wanted(self, now: float, demand: float) -> dict[str, int]:
        self.scaler.observe(now, demand)
        self.units = self.scaler.decide(now, self.units).replicas
        return self.mix(self.units)

    def mix(self, units: int) -> dict[str, int]:
        """The cheapest engines per tier for ``units`` (cached: it is a search)."""
        if units not in self._mixes:
            self._mixes[units] = cheapest_mix(units, self.options, self.max_engines)
        return self._mixes[units]


def compressed(cfg: AutoscaleConfig, compression: float) -> AutoscaleConfig:
    """The autoscaler's day-clock windows on the simulated clock."""
    return AutoscaleConfig(
        target_per_engine=cfg.target_per_engine,
        stable_window_s=cfg.stable_window_s / compression,
        panic_window_s=cfg.panic_window_s / compression,
        panic_threshold=cfg.panic_threshold,
        scale_to_zero_after_s=cfg.scale_to_zero_after_s / compression,
    )


def units_of(mix: Mapping[str, int], tiers: Sequence[Tier]) -> int:
    """The units a mix of engines is worth."""
    speed = {t.name: t.speed for t in tiers}
    return sum(speed[n] * c for n, c in mix.items())


def price_of(mix: Mapping[str, int], tiers: Sequence[Tier]) -> float:
    """Dollars per hour of a mix of engines."""
    price = {t.name: t.price for t in tiers}
    return sum(price[n] * c for n, c in mix.items())


def slow_factors(speeds: Mapping[str, float]) -> dict[str, float]:
    """Each tier's step-time multiplier: the fastest tier runs the simulator's H100 model."""
    fastest = max(speeds.values())
    return {n: fastest / s if s > 0 else math.inf for n, s in speeds.items()}


__all__ = [
    "CostAwarePolicy",
    "FixedPolicy",
    "Policy",
    "Tier",
    "compressed",
    "price_of",
    "slow_factors",
    "units_of",
]
