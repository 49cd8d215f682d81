"""What GPUs cost: a price per GPU-hour by tier, and what engines and deployments cost now.

Sans-I/O. Prices come from ``--gpu-prices h100=4.10,l4=0.70`` (dollars per GPU-hour, by the
tier :func:`~.gpuchoice.gpu_tier` reads from a GPU's name); a tier without a price costs 0, and
so do engines without GPUs. Placement prefers the cheapest tier that fits
(:func:`~.gpuchoice.choose`); :func:`engine_costs` and :func:`deployment_costs` feed the
``fleet_cost_dollars_per_hour`` metrics and ``fleet deployments``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from fleet.protocol.errors import ConfigError

from .gpuchoice import gpu_tier
from .placement import Placer
from .registry import FleetRegistry

Prices = Mapping[str, float]
_TIER = re.compile(r"^[a-z][a-z0-9]*$")


def parse_prices(spec: str, *, flag: str = "--gpu-prices") -> dict[str, float]:
    """``h100=4.10,l4=0.70`` -> ``{"h100": 4.1, "l4": 0.7}`` (dollars per GPU-hour).

    Raises:
        ConfigError: an item that is not TIER=PRICE, a tier named twice, a price < 0.
    """
    prices: dict[str, float] = {}
    for item in (i.strip() for i in spec.split(",")):
        tier, eq, value = item.partition("=")
        tier = tier.strip().lower()
        try:
            price = float(value)
        except ValueError:
            price = math.nan
        if not eq or not _TIER.match(tier) or not math.isfinite(price):
            raise ConfigError(flag, item, "expected TIER=DOLLARS_PER_GPU_HOUR, e.g. h100=4.10")
        if price < 0:
            raise ConfigError(flag, item, "a price must be >= 0")
        if tier in prices:
            raise ConfigError(flag, item, f"tier {tier} is priced twice")
        prices[tier] = price
    return prices


def engine_costs(registry: FleetRegistry, prices: Prices) -> dict[str, float]:
    """Dollars per hour of every engine live nodes run (each rank of a group on its node)."""
    out: dict[str, float] = {}
    for node in registry.live_nodes():
        names = {g.index: g.name for g in node.gpus}
        for engine_id, engine in node.engines.items():
            cost = sum(prices.get(gpu_tier(names.get(i, "")), 0.0) for i in engine.gpus)
            out[engine_id] = out.get(engine_id, 0.0) + cost
    return out


def deployment_costs(registry: FleetRegistry, placer: Placer, prices: Prices) -> dict[str, float]:
    """Dollars per hour of each deployment's engines (every deployment, 0 when none run)."""
    out = {d.name: 0.0 for d in placer.deployments}
    for engine_id, cost in engine_costs(registry, prices).items():
        owner = placer.owner(engine_id)
        if owner is not None:
            out[owner.name] += cost
    return out


__all__ = ["Prices", "deployment_costs", "engine_costs", "parse_prices"]
