"""Cost-aware placement (coordinator/costs.py, gpuchoice.choose's prices): the cheapest tier
that fits, tier preference first, and what engines and deployments cost."""

from __future__ import annotations

import pytest

from fleet.agent.fakenvml import FakeNvml, parse_fake_gpus
from fleet.coordinator.costs import deployment_costs, engine_costs, parse_prices
from fleet.coordinator.deployment import Deployment
from fleet.coordinator.placement import Placer
from fleet.coordinator.registry import FleetRegistry
from fleet.protocol.errors import ConfigError
from fleet.protocol.messages import EngineStatus, GpuInfo, Heartbeat, Register

PRICES = {"h100": 4.0, "a100": 2.0, "l4": 0.5}


def gpus(*tiers: str) -> tuple[GpuInfo, ...]:
    return tuple(
        GpuInfo(i, f"u{i}", f"NVIDIA {t.upper()}", 80 << 30, 0, 0.0, 30.0, 70.0, 0, True)
        for i, t in enumerate(tiers)
    )


def fleet(**nodes: tuple[GpuInfo, ...]) -> FleetRegistry:
    registry = FleetRegistry(lost_after_s=10.0)
    for node_id, node_gpus in nodes.items():
        registry.register(Register(node_id, "", "0", gpus=node_gpus), 0.0)
    return registry


def run(registry: FleetRegistry, node_id: str, *engines: tuple[str, tuple[int, ...]]) -> None:
    record = registry.node(node_id)
    assert record is not None
    statuses = tuple(
        EngineStatus(engine_id=e, model="m", url="", state="ready", gpus=g) for e, g in engines
    )
    registry.heartbeat(Heartbeat(node_id, 1, True, record.gpus, statuses), 0.0)


def placed(placer: Placer, registry: FleetRegistry) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {
        p.assign.spec.engine_id: (p.node_id, p.assign.spec.gpus)
        for p in placer.reconcile(registry, 0.0)
    }


def test_prices_parse_and_bad_ones_name_the_item() -> None:
    assert parse_prices("h100=4.10, L4=0.7") == {"h100": 4.1, "l4": 0.7}
    for bad, why in [
        ("h100", "TIER=DOLLARS"),
        ("h100=x", "TIER=DOLLARS"),
        ("h100=nan", "TIER=DOLLARS"),
        ("h100=-1", ">= 0"),
        ("h100=1,h100=2", "twice"),
        ("=1", "TIER=DOLLARS"),
    ]:
        with pytest.raises(ConfigError, match=why) as info:
            parse_prices(bad)
        assert "--gpu-prices" in str(info.value)


def test_placement_prefers_the_cheapest_tier_that_fits() -> None:
    registry = fleet(a=gpus("h100", "h100"), b=gpus("l4", "l4"), c=gpus("a100"))
    placer = Placer((Deployment("m", "/m", replicas=3, gpus_per_engine=1),), assign_timeout_s=30)
    placer.prices = PRICES
    # Cheapest first: both L4s, then the A100; the H100s stay free.
    assert placed(placer, registry) == {"m-0": ("b", (0,)), "m-1": ("b", (1,)), "m-2": ("c", (0,))}


def test_without_prices_replicas_spread_over_nodes() -> None:
    registry = fleet(a=gpus("h100", "h100"), b=gpus("l4", "l4"))
    placer = Placer((Deployment("m", "/m", replicas=2, gpus_per_engine=1),), assign_timeout_s=30)
    assert sorted(n for n, _ in placed(placer, registry).values()) == ["a", "b"]


def test_a_tier_preference_comes_before_price() -> None:
    registry = fleet(a=gpus("h100"), b=gpus("l4"))
    d = Deployment("m", "/m", replicas=1, gpus_per_engine=1, tiers=("h100",))
    placer = Placer((d,), assign_timeout_s=30)
    placer.prices = PRICES
    assert placed(placer, registry) == {"m-0": ("a", (0,))}


def test_engines_and_deployments_cost_what_their_gpus_do() -> None:
    registry = fleet(a=gpus("h100", "h100", "l4"), b=gpus("l4", "t4"))
    run(registry, "a", ("m-0", (0, 1)), ("cpu-0", ()))
    run(registry, "b", ("m-1", (0,)), ("n-0", (1,)), ("stray-0", (0,)))
    costs = engine_costs(registry, PRICES)
    assert costs == {"m-0": 8.0, "cpu-0": 0.0, "m-1": 0.5, "n-0": 0.0, "stray-0": 0.5}
    placer = Placer(
        (Deployment("m", "/m", replicas=2), Deployment("n", "/n"), Deployment("idle", "/i")),
        assign_timeout_s=30,
    )
    assert deployment_costs(registry, placer, PRICES) == {"m": 8.5, "n": 0.0, "idle": 0.0}


def test_fake_gpus_carry_the_tier_they_stand_for() -> None:
    specs = parse_fake_gpus("1x80GiB@h100,1x24GiB@l4:unhealthy,1x16GiB")
    assert [(s.tier, s.healthy) for s in specs] == [("h100", True), ("l4", False), ("", True)]
    nvml = FakeNvml(specs, node="n1")
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    assert nvml.nvmlDeviceGetName(handle) == "Fake NVIDIA H100 80GiB"
    for bad in ("1x80GiB@H100", "1x80GiB@h", "1x80GiB@"):
        with pytest.raises(ConfigError, match="TIER"):
            parse_fake_gpus(bad)
