"""The cheapest mix of GPU tiers that gives a deployment the capacity its autoscaler asks for.

Sans-I/O. The autoscaler (:mod:`.autoscale`) counts in *units*: one unit is an engine that holds
``target_per_engine`` requests. An engine on a tier of speed ``s`` is ``s`` units (an H100
engine may hold three times what an L4 engine holds: ``--tier-speeds h100=3,l4=1``) and costs
its GPUs' price per hour. :func:`cheapest_mix` picks engine counts per tier that reach the units
at the least price, within what each tier can host now; :func:`slot_tiers` orders them into the
deployment's engine slots, the most cost-efficient tier first, so that scaling down (which stops
the highest-numbered engines) gives back the least efficient engines first.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fleet.protocol.errors import ConfigError


@dataclass(frozen=True)
class TierOption:
    """One tier a deployment's engines can run on.

    Args:
        tier: its name (``h100``).
        speed: units one engine there is worth (> 0).
        price: dollars per hour of one engine there (its GPUs' prices).
        room: engines of the deployment the tier can host now (those it runs, plus free GPUs).
    """

    tier: str
    speed: float
    price: float
    room: int

    def __post_init__(self) -> None:
        if not self.speed > 0:
            raise ConfigError("speed", self.speed, f"of tier {self.tier} must be > 0")
        if self.price < 0 or self.room < 0:
            raise ConfigError("price/room", (self.price, self.room), "must be >= 0")

    @property
    def per_unit(self) -> float:
        return self.price / self.speed


def parse_speeds(spec: str, *, flag: str = "--tier-speeds") -> dict[str, float]:
    """``h100=3,l4=1`` -> ``{"h100": 3.0, "l4": 1.0}`` (units per engine; unlisted tiers: 1).

    Raises:
        ConfigError: an item that is not TIER=SPEED with a speed > 0, a tier named twice.
    """
    speeds: dict[str, float] = {}
    for item in (i.strip() for i in spec.split(",")):
        tier, eq, value = item.partition("=")
        tier = tier.strip().lower()
        try:
            speed = float(value)
        except ValueError:
            speed = math.nan
        if not eq or not tier or not math.isfinite(speed) or speed <= 0:
            raise ConfigError(flag, item, "expected TIER=SPEED with a speed > 0, e.g. h100=3")
        if tier in speeds:
            raise ConfigError(flag, item, f"tier {tier} is named twice")
        speeds[tier] = speed
    return speeds


def cheapest_mix(units: int, options: Sequence[TierOption], max_engines: int) -> dict[str, int]:
    """Engines per tier reaching ``units`` at the least price per hour.

    Ties go to fewer engines, then to the mix with more units. Within ``room`` per tier and
    ``max_engines`` in all; when even every engine that fits cannot reach ``units``, the most
    units that fit, cheapest first. Tiers with no engine are left out of the result.
    """
    if units <= 0 or max_engines <= 0:
        return {}
    usable = sorted(
        (o for o in options if o.room > 0), key=lambda o: (o.per_unit, -o.speed, o.tier)
    )
    if not usable:
        return {}
    best: tuple[tuple[float, int, float], tuple[int, ...]] | None = None
    fallback: tuple[tuple[float, float, int], tuple[int, ...]] | None = None
    *head, last = usable
    ranges = [range(min(o.room, max_engines) + 1) for o in head]
    for counts in itertools.product(*ranges):
        used = sum(counts)
        if used > max_engines:
            continue
        got = sum(n * o.speed for n, o in zip(counts, head, strict=True))
        price = sum(n * o.price for n, o in zip(counts, head, strict=True))
        short = max(0.0, units - got)
        extra = min(math.ceil(short / last.speed - 1e-9), last.room, max_engines - used)
        mix = (*counts, extra)
        got += extra * last.speed
        price += extra * last.price
        engines = used + extra
        if got >= units - 1e-9:
            key = (round(price, 9), engines, -got)
            if best is None or key < best[0]:
                best = (key, mix)
        else:
            fkey = (-got, round(price, 9), engines)
            if fallback is None or fkey < fallback[0]:
                fallback = (fkey, mix)
    chosen = best[1] if best is not None else fallback[1] if fallback is not None else ()
    return {o.tier: n for o, n in zip(usable, chosen, strict=True) if n > 0}


def slot_tiers(mix: Mapping[str, int], options: Sequence[TierOption]) -> tuple[str, ...]:
    """The tier of each engine slot: the mix's engines, the most cost-efficient tier first."""
    order = sorted(options, key=lambda o: (o.per_unit, -o.speed, o.tier))
    return tuple(o.tier for o in order for _ in range(mix.get(o.tier, 0)))


def mix_units(mix: Mapping[str, int], speeds: Mapping[str, float]) -> float:
    """The units a mix is worth."""
    return sum(n * speeds.get(tier, 1.0) for tier, n in mix.items())


__all__ = ["TierOption", "cheapest_mix", "mix_units", "parse_speeds", "slot_tiers"]
