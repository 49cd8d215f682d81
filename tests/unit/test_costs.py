"""Cost-aware placement (coordinator/costs.py, gpuchoice.choose's prices): the cheapest tier
that fits, tier preference first, and what engines and deployments cost."""

from __future__ import annotations

import pytest

from fleet.agent.fakenvml import FakeNvml, parse_fake_gpus
from fleet.coordinator.autoscale import AutoscaleConfig
from fleet.coordinator.costs import deployment_costs, engine_costs, parse_prices
from fleet.coordinator.deploybook import DeploymentBook, EngineDefaults
from fleet.coordinator.deployment import Deployment
from fleet.coordinator.deployspec import FleetModel, parse_model
from fleet.coordinator.placement import Placer
from fleet.coordinator.registry import FleetRegistry
from fleet.coordinator.scaling import Scaling, tier_slots
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


# -- the autoscaler's cheapest mix, through Scaling and the placer ------------------------------


def autoscaled(name: str, low: int, high: int) -> FleetModel:
    doc = {"apiVersion": "fleet.dev/v1alpha1", "kind": "FleetModel", "metadata": {"name": name},
           "spec": {"source": "/m", "minReplicas": low, "maxReplicas": high}}  # fmt: skip
    return parse_model(doc)


def test_units_become_the_cheapest_tiers_and_their_slots_are_placed_there() -> None:
    registry = fleet(big=gpus("h100", "h100"), small=gpus("l4", "l4"))
    model = autoscaled("m", 0, 6)
    book = DeploymentBook(defaults=EngineDefaults(gpus_per_engine=1))
    book.put(model)
    placer = Placer(book.deployments()[0], assign_timeout_s=30)
    placer.prices = {"h100": 4.0, "l4": 1.0}
    speeds = {"h100": 6.0, "l4": 1.0}  # an h100 engine: 6 units at 4 $/h, cheaper per unit
    cfg = AutoscaleConfig(target_per_engine=1, stable_window_s=10, panic_window_s=1)
    scaling = Scaling(cfg, max_speed=6.0)

    def mix(m: FleetModel, units: int, before: tuple[str, ...]) -> tuple[str, ...] | None:
        return tier_slots(m, units, before, placer, registry, speeds)

    def tick(demand: float, now: float) -> None:
        if scaling.tick([model], lambda _: demand, now, mix):
            placer.replace(book.deployments(scaling.counts, scaling.slots)[0])

    tick(1.0, 0.0)  # from zero: one unit, the cheapest engine is an l4 (1 $/h)
    assert (scaling.units, scaling.counts, scaling.slots) == ({"m": 1}, {"m": 1}, {"m": ("l4",)})
    assert placed(placer, registry) == {"m-0": ("small", (0,))}
    tick(9.0, 0.5)  # panic: mean 5 units; m-0 keeps its l4 (1), 4 more as one h100 (6)
    assert scaling.units == {"m": 5} and scaling.slots == {"m": ("l4", "h100")}
    assert placed(placer, registry) == {"m-1": ("big", (0,))}
    tick(13.0, 0.9)  # mean 7.67: 8 units; 1 short: the second l4 (1 $/h) beats an h100
    assert scaling.slots == {"m": ("l4", "h100", "l4")}
    assert placed(placer, registry) == {"m-2": ("small", (1,))}
    tick(0.0, 30.0)  # quiet: 1 unit (idle); the last slots go while the rest still reach it
    assert scaling.slots == {"m": ("l4",)} and scaling.counts == {"m": 1}


def test_no_prices_or_a_tier_list_means_one_engine_per_unit_anywhere() -> None:
    registry = fleet(big=gpus("h100"))
    placer = Placer((Deployment("m", "/m", name="m", gpus_per_engine=1),), assign_timeout_s=30)
    assert tier_slots(autoscaled("m", 0, 4), 2, (), placer, registry, {}) is None  # no prices
    placer.prices = PRICES
    assert tier_slots(autoscaled("m", 0, 4), 2, (), placer, registry, {}) == ("h100",)  # room 1
    listed = parse_model({"apiVersion": "fleet.dev/v1alpha1", "kind": "FleetModel",
                          "metadata": {"name": "m"}, "spec": {"source": "/m", "minReplicas": 0,
                          "maxReplicas": 4, "gpuTier": ["h100"]}})  # fmt: skip
    assert tier_slots(listed, 2, (), placer, registry, {}) is None  # its own preference rules
