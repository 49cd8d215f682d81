"""The cheapest mix of GPU tiers for a deployment's capacity (coordinator/costmix.py)."""

from __future__ import annotations

import itertools

import pytest

from fleet.coordinator.costmix import (
    TierOption,
    cheapest_mix,
    mix_units,
    parse_speeds,
    slot_tiers,
)
from fleet.protocol.errors import ConfigError

H100 = TierOption("h100", speed=3.0, price=4.0, room=4)  # 1.33 $/unit
A100 = TierOption("a100", speed=2.0, price=2.2, room=4)  # 1.10 $/unit
L4 = TierOption("l4", speed=1.0, price=0.7, room=4)  # 0.70 $/unit


def price(mix: dict[str, int], options: list[TierOption]) -> float:
    return sum(n * o.price for o in options for t, n in mix.items() if o.tier == t)


def brute(units: int, options: list[TierOption], max_engines: int) -> float:
    """The least price reaching ``units``, by trying every mix."""
    best = float("inf")
    for counts in itertools.product(*(range(o.room + 1) for o in options)):
        if (
            sum(counts) <= max_engines
            and sum(n * o.speed for n, o in zip(counts, options, strict=True)) >= units
        ):
            best = min(best, sum(n * o.price for n, o in zip(counts, options, strict=True)))
    return best


def test_the_cheapest_per_unit_tier_fills_first() -> None:
    assert cheapest_mix(3, [H100, A100, L4], 8) == {"l4": 3}
    assert cheapest_mix(0, [H100, A100, L4], 8) == {}


def test_when_the_cheap_tier_runs_out_the_next_cheapest_per_unit_takes_over() -> None:
    mix = cheapest_mix(8, [H100, A100, L4], 8)  # 4 × l4 = 4 units; 2 × a100 = 4 more
    assert mix == {"l4": 4, "a100": 2}
    assert price(mix, [H100, A100, L4]) == pytest.approx(7.2)


def test_an_engine_limit_favours_fast_tiers() -> None:
    mix = cheapest_mix(9, [H100, A100, L4], 3)  # three engines can only reach 9 as h100s
    assert mix == {"h100": 3}


@pytest.mark.parametrize("units", range(1, 16))
@pytest.mark.parametrize("max_engines", [2, 4, 12])
def test_the_mix_is_the_cheapest_of_all(units: int, max_engines: int) -> None:
    options = [H100, A100, L4]
    mix = cheapest_mix(units, options, max_engines)
    least = brute(units, options, max_engines)
    if least == float("inf"):  # cannot be reached: the most units that fit
        best_units = max(
            sum(n * o.speed for n, o in zip(c, options, strict=True))
            for c in itertools.product(*(range(o.room + 1) for o in options))
            if sum(c) <= max_engines
        )
        assert mix_units(mix, {o.tier: o.speed for o in options}) == best_units
    else:
        assert price(mix, options) == pytest.approx(least)
        assert sum(mix.values()) <= max_engines


def test_slots_put_the_most_efficient_tier_first() -> None:
    assert slot_tiers({"h100": 1, "l4": 2}, [H100, A100, L4]) == ("l4", "l4", "h100")


def test_a_tier_without_room_is_skipped() -> None:
    full = TierOption("l4", 1.0, 0.7, room=0)
    assert cheapest_mix(2, [full, A100], 4) == {"a100": 1}
    assert cheapest_mix(2, [full], 4) == {}


def test_speeds_parse_and_bad_ones_name_the_flag() -> None:
    assert parse_speeds("H100=3, l4=1") == {"h100": 3.0, "l4": 1.0}
    for bad in ("h100", "h100=0", "h100=-1", "h100=x", "a=1,a=2"):
        with pytest.raises(ConfigError, match="--tier-speeds"):
            parse_speeds(bad)
    with pytest.raises(ConfigError, match="speed"):
        TierOption("x", 0.0, 1.0, 1)
