"""Placement (fleet.coordinator.placement): which node runs which engine.

A real :class:`FleetRegistry` is fed Register/Heartbeat messages with explicit ``now``; the
tests assert the assignments :meth:`Placer.reconcile` returns and what it returns next.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from fleet.coordinator.placement import Deployment, Placement, Placer
from fleet.coordinator.registry import FleetRegistry
from fleet.protocol.errors import ConfigError
from fleet.protocol.messages import AssignEngine, EngineSpec, EngineStatus, GpuInfo, Heartbeat
from fleet.protocol.messages import Register as RegisterMsg

TIMEOUT_S = 30.0
LOST_AFTER_S = 10.0


def gpu(index: int, *, healthy: bool = True) -> GpuInfo:
    return GpuInfo(
        index=index,
        uuid=f"GPU-{index}",
        name="H100",
        memory_total_bytes=80 << 30,
        memory_used_bytes=0,
        utilization_pct=0.0,
        temperature_c=30.0,
        power_w=70.0,
        ecc_uncorrected=0,
        healthy=healthy,
    )


def status(engine_id: str, *, model: str = "m", gpus: tuple[int, ...] = ()) -> EngineStatus:
    return EngineStatus(
        engine_id=engine_id, model=model, url="http://127.0.0.1:1", state="starting", gpus=gpus
    )


def deployment(model: str = "m", **kw: Any) -> Deployment:
    return Deployment(model=model, model_path=f"/models/{model}", **kw)


class Fleet:
    """A registry with helpers to add nodes and report engines."""

    def __init__(self) -> None:
        self.registry = FleetRegistry(lost_after_s=LOST_AFTER_S)

    def node(
        self,
        node_id: str,
        *engines: EngineStatus,
        gpus: tuple[GpuInfo, ...] = (),
        healthy: bool = True,
        now: float = 0.0,
    ) -> None:
        msg = RegisterMsg(node_id=node_id, agent_url="", agent_version="0", gpus=gpus)
        self.registry.register(msg, now)
        self.report(node_id, *engines, healthy=healthy, now=now)

    def report(
        self, node_id: str, *engines: EngineStatus, healthy: bool = True, now: float = 0.0
    ) -> None:
        record = self.registry.node(node_id)
        assert record is not None
        hb = Heartbeat(node_id=node_id, seq=1, healthy=healthy, gpus=record.gpus, engines=engines)
        assert self.registry.heartbeat(hb, now)

    def engines(self, node_id: str) -> list[EngineStatus]:
        record = self.registry.node(node_id)
        assert record is not None
        return list(record.engines.values())

    def report_placed(self, placements: list[Placement], now: float) -> None:
        """Each node reports every engine it was assigned (plus what it already runs)."""
        by_node: dict[str, list[EngineStatus]] = {}
        for p in placements:
            spec = p.assign.spec
            by_node.setdefault(p.node_id, []).append(
                status(spec.engine_id, model=spec.model, gpus=spec.gpus)
            )
        for node_id, engines in by_node.items():
            self.report(node_id, *self.engines(node_id), *engines, now=now)


def placed(placements: list[Placement]) -> dict[str, str]:
    return {p.assign.spec.engine_id: p.node_id for p in placements}


# -- Deployment --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"model": ""}, "model"),
        ({"replicas": -1}, "replicas"),
        ({"kind": "tgi"}, "engine"),
        ({"role": "both-ish"}, "role"),
        ({"gpus_per_engine": -1}, "gpus_per_engine"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": -16}, "block_size"),
        ({"max_model_len": 0}, "max_model_len"),
    ],
)
def test_bad_deployment_raises_config_error_naming_the_key(
    changes: dict[str, Any], key: str
) -> None:
    args: dict[str, Any] = {"model": "m", "model_path": "/models/m", **changes}
    with pytest.raises(ConfigError) as info:
        Deployment(**args)
    assert info.value.key == key
    assert info.value.value == next(iter(changes.values()))
    assert str(info.value).startswith(f"{key}=")


def test_deployment_engine_ids_and_spec() -> None:
    d = deployment(
        "qwen",
        replicas=3,
        kind="sim",
        role="prefill",
        block_size=16,
        max_model_len=4096,
        extra_args=("--enforce-eager",),
    )
    assert d.engine_ids() == ["qwen-0", "qwen-1", "qwen-2"]
    assert deployment(replicas=0).engine_ids() == []
    assert d.spec("qwen-1", (2, 3)) == EngineSpec(
        engine_id="qwen-1",
        model="qwen",
        model_path="/models/qwen",
        kind="sim",
        role="prefill",
        gpus=(2, 3),
        block_size=16,
        max_model_len=4096,
        extra_args=("--enforce-eager",),
    )


def test_duplicate_deployment_names_are_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        Placer((deployment("a"), deployment("b"), deployment("a")), assign_timeout_s=TIMEOUT_S)
    assert info.value.key == "name"
    assert "own name" in str(info.value)


def test_versions_of_one_served_name_are_deployments_of_their_own() -> None:
    v1 = deployment("chat", name="chat-v1", replicas=2, traffic_weight=90)
    v2 = deployment("chat", name="chat-v2", aliases=("chat-latest",), traffic_weight=10)
    placer = Placer((v1, v2), assign_timeout_s=TIMEOUT_S)
    assert v1.engine_ids() == ["chat-v1-0", "chat-v1-1"] and v2.engine_ids() == ["chat-v2-0"]
    assert placer.serving("chat") == [v1, v2] and placer.serving("chat-latest") == [v2]
    assert placer.owner("chat-v1-1") is v1 and placer.owner("chat-v2-0") is v2
    assert placer.owner("chat-v2-1") is None
    assert v2.spec("chat-v2-0", ()).aliases == ("chat-latest",)


def test_replaced_deployments_leave_their_engines_unwanted() -> None:
    fleet = Fleet()
    fleet.node("a", status("m-0"), status("m-1"), status("gone-0", model="gone"))
    placer = Placer(
        (deployment("m", replicas=2), deployment("gone")), assign_timeout_s=TIMEOUT_S,
        settle_until=1.0,
    )  # fmt: skip
    assert placer.unwanted(fleet.registry, now=2.0) == []
    placer.replace((deployment("m", replicas=1),))  # "gone" deleted, m scaled down
    assert placer.unwanted(fleet.registry, now=0.5) == []  # settling: nothing known yet
    assert sorted(placer.unwanted(fleet.registry, now=2.0)) == [("a", "gone-0"), ("a", "m-1")]
    placer.replace((deployment("m", replicas=3),))  # scaled up: a new engine to place
    assert placed(placer.reconcile(fleet.registry, now=2.0)) == {"m-2": "a"}
    assert sorted(placer.unwanted(fleet.registry, now=2.0)) == [("a", "gone-0")]


def test_deployment_lookup_by_model() -> None:
    a, b = deployment("a"), deployment("b")
    placer = Placer((a, b), assign_timeout_s=TIMEOUT_S)
    assert placer.deployment("b") is b
    assert placer.deployment("c") is None


# -- reconcile ---------------------------------------------------------------------------------


def test_reconcile_assigns_every_replica_spread_over_nodes() -> None:
    fleet = Fleet()
    for node_id in ("a", "b", "c"):
        fleet.node(node_id)
    placer = Placer((deployment("m", replicas=6),), assign_timeout_s=TIMEOUT_S)
    out = placer.reconcile(fleet.registry, now=0.0)
    assert sorted(placed(out)) == [f"m-{i}" for i in range(6)]
    assert Counter(placed(out).values()) == {"a": 2, "b": 2, "c": 2}
    for p in out:
        assert isinstance(p.assign, AssignEngine)
        assert p.assign.spec == deployment("m", replicas=6).spec(p.assign.spec.engine_id, ())


def test_nothing_is_placed_while_settling_then_every_registered_node_shares() -> None:
    """A (re)started coordinator waits until every live node could have registered: placing
    at the first registration would put every engine on the first node to speak."""
    fleet = Fleet()
    placer = Placer((deployment("m", replicas=4),), assign_timeout_s=TIMEOUT_S, settle_until=3.0)
    fleet.node("a", now=0.5)
    assert placer.reconcile(fleet.registry, now=0.5) == []
    fleet.node("b", now=2.9)
    assert placer.reconcile(fleet.registry, now=2.999) == []
    out = placer.reconcile(fleet.registry, now=3.0)
    assert Counter(placed(out).values()) == {"a": 2, "b": 2}


def test_spread_counts_engines_nodes_already_run() -> None:
    fleet = Fleet()
    fleet.node("a", status("other-0", model="other"), status("other-1", model="other"))
    fleet.node("b")
    placer = Placer((deployment("m", replicas=2),), assign_timeout_s=TIMEOUT_S)
    assert Counter(placed(placer.reconcile(fleet.registry, now=0.0)).values()) == {"b": 2}


def test_no_live_nodes_means_no_placements() -> None:
    placer = Placer((deployment("m", replicas=2),), assign_timeout_s=TIMEOUT_S)
    assert placer.reconcile(FleetRegistry(lost_after_s=LOST_AFTER_S), now=0.0) == []


def test_zero_replicas_places_nothing() -> None:
    fleet = Fleet()
    fleet.node("a")
    placer = Placer((deployment("m", replicas=0),), assign_timeout_s=TIMEOUT_S)
    assert placer.reconcile(fleet.registry, now=0.0) == []


def test_reconcile_is_idempotent_while_pending() -> None:
    fleet = Fleet()
    fleet.node("a")
    fleet.node("b")
    placer = Placer((deployment("m", replicas=2),), assign_timeout_s=TIMEOUT_S)
    assert len(placer.reconcile(fleet.registry, now=0.0)) == 2
    assert placer.reconcile(fleet.registry, now=0.0) == []
    assert placer.reconcile(fleet.registry, now=TIMEOUT_S - 0.001) == []


def test_unreported_assignment_is_resent_to_the_same_node_after_the_timeout() -> None:
    fleet = Fleet()
    fleet.node("a")
    fleet.node("b")
    placer = Placer((deployment("m", replicas=2),), assign_timeout_s=TIMEOUT_S)
    first = placer.reconcile(fleet.registry, now=0.0)
    fleet.report_placed([p for p in first if p.assign.spec.engine_id == "m-0"], now=1.0)
    resent = placer.reconcile(fleet.registry, now=TIMEOUT_S)
    assert resent == [p for p in first if p.assign.spec.engine_id == "m-1"]
    # The resend restarts the timer.
    assert placer.reconcile(fleet.registry, now=2 * TIMEOUT_S - 1) == []
    assert placer.reconcile(fleet.registry, now=2 * TIMEOUT_S) == resent


def test_reconcile_stops_once_the_node_reports_the_engine() -> None:
    fleet = Fleet()
    fleet.node("a")
    placer = Placer((deployment("m", replicas=2),), assign_timeout_s=TIMEOUT_S)
    fleet.report_placed(placer.reconcile(fleet.registry, now=0.0), now=1.0)
    for now in (2.0, TIMEOUT_S, 10 * TIMEOUT_S):
        assert placer.reconcile(fleet.registry, now=now) == []


def test_engines_of_a_lost_node_are_placed_on_a_live_node() -> None:
    fleet = Fleet()
    fleet.node("a")
    fleet.node("b")
    placer = Placer((deployment("m", replicas=2),), assign_timeout_s=TIMEOUT_S)
    first = placer.reconcile(fleet.registry, now=0.0)
    assert placed(first) == {"m-0": "a", "m-1": "b"}
    fleet.report_placed(first, now=1.0)
    fleet.report("b", *fleet.engines("b"), now=8.0)
    assert fleet.registry.expire(now=11.5) == ["a"]
    again = placer.reconcile(fleet.registry, now=11.5)
    assert placed(again) == {"m-0": "b"}
    assert again[0].assign.spec == first[0].assign.spec


def test_pending_assignment_to_a_node_that_is_lost_is_placed_elsewhere() -> None:
    fleet = Fleet()
    fleet.node("a")
    placer = Placer((deployment("m"),), assign_timeout_s=TIMEOUT_S)
    assert placed(placer.reconcile(fleet.registry, now=0.0)) == {"m-0": "a"}
    fleet.node("b", now=5.0)
    fleet.registry.expire(now=10.5)
    assert placed(placer.reconcile(fleet.registry, now=10.5)) == {"m-0": "b"}
    assert placer.reconcile(fleet.registry, now=11.0) == []


def test_replacement_spreads_over_pending_and_reported_engines() -> None:
    # c is lost before b reported its (still pending) engines: they count toward b's load.
    fleet = Fleet()
    for node_id in ("a", "b", "c"):
        fleet.node(node_id)
    placer = Placer((deployment("m", replicas=6),), assign_timeout_s=TIMEOUT_S)
    first = placer.reconcile(fleet.registry, now=0.0)
    fleet.report_placed([p for p in first if p.node_id == "a"], now=5.0)
    fleet.report("b", now=5.0)
    fleet.registry.expire(now=10.5)
    again = placer.reconcile(fleet.registry, now=10.5)
    assert len(again) == 2
    assert Counter(placed(again).values()) == {"a": 1, "b": 1}


# -- GPUs and health ---------------------------------------------------------------------------


def test_gpus_are_healthy_unused_indices() -> None:
    fleet = Fleet()
    gpus = (gpu(0), gpu(1, healthy=False), gpu(2), gpu(3), gpu(4))
    fleet.node("a", status("x-0", model="x", gpus=(0,)), gpus=gpus)
    placer = Placer((deployment("m", replicas=2, gpus_per_engine=2),), assign_timeout_s=TIMEOUT_S)
    out = placer.reconcile(fleet.registry, now=0.0)
    # Free: 2, 3, 4 (0 is used by x-0, 1 is unhealthy): room for one pair only.
    assert [(p.assign.spec.engine_id, p.assign.spec.gpus) for p in out] == [("m-0", (2, 3))]


def test_pending_assignments_reserve_their_gpus() -> None:
    fleet = Fleet()
    fleet.node("a", gpus=tuple(gpu(i) for i in range(4)))
    placer = Placer((deployment("m", replicas=3, gpus_per_engine=2),), assign_timeout_s=TIMEOUT_S)
    out = placer.reconcile(fleet.registry, now=0.0)
    assert {p.assign.spec.engine_id: p.assign.spec.gpus for p in out} == {
        "m-0": (0, 1),
        "m-1": (2, 3),
    }
    # Still no room while both are pending, and none once they are reported either.
    assert placer.reconcile(fleet.registry, now=1.0) == []
    fleet.report_placed(out, now=2.0)
    assert placer.reconcile(fleet.registry, now=3.0) == []
    # A GPU freed on the node (m-1 gone) is used again.
    fleet.report("a", status("m-0", gpus=(0, 1)), now=4.0)
    again = placer.reconcile(fleet.registry, now=5.0)
    assert [(p.assign.spec.engine_id, p.assign.spec.gpus) for p in again] == [("m-1", (2, 3))]


def test_nodes_without_enough_gpus_are_skipped() -> None:
    fleet = Fleet()
    fleet.node("a", gpus=(gpu(0),))
    fleet.node("b", gpus=(gpu(0), gpu(1, healthy=False)))
    fleet.node("c", gpus=(gpu(5), gpu(7)))
    placer = Placer((deployment("m", gpus_per_engine=2),), assign_timeout_s=TIMEOUT_S)
    out = placer.reconcile(fleet.registry, now=0.0)
    assert [(p.node_id, p.assign.spec.gpus) for p in out] == [("c", (5, 7))]


def test_no_node_with_enough_gpus_places_nothing() -> None:
    fleet = Fleet()
    fleet.node("a", gpus=(gpu(0),))
    placer = Placer((deployment("m", gpus_per_engine=2),), assign_timeout_s=TIMEOUT_S)
    assert placer.reconcile(fleet.registry, now=0.0) == []
    fleet.node("b", gpus=(gpu(0), gpu(1)), now=1.0)
    assert placed(placer.reconcile(fleet.registry, now=1.0)) == {"m-0": "b"}


def test_cpu_engines_need_no_gpus() -> None:
    fleet = Fleet()
    fleet.node("a")
    placer = Placer((deployment("m", gpus_per_engine=0),), assign_timeout_s=TIMEOUT_S)
    assert [p.assign.spec.gpus for p in placer.reconcile(fleet.registry, now=0.0)] == [()]


def test_unhealthy_nodes_are_skipped() -> None:
    fleet = Fleet()
    fleet.node("a", healthy=False)
    fleet.node("b")
    placer = Placer((deployment("m", replicas=2),), assign_timeout_s=TIMEOUT_S)
    assert placed(placer.reconcile(fleet.registry, now=0.0)) == {"m-0": "b", "m-1": "b"}


def test_only_unhealthy_nodes_means_no_placements_until_one_recovers() -> None:
    fleet = Fleet()
    fleet.node("a", healthy=False)
    placer = Placer((deployment("m"),), assign_timeout_s=TIMEOUT_S)
    assert placer.reconcile(fleet.registry, now=0.0) == []
    fleet.report("a", healthy=True, now=1.0)
    assert placed(placer.reconcile(fleet.registry, now=1.0)) == {"m-0": "a"}


def test_several_deployments_are_all_placed() -> None:
    fleet = Fleet()
    fleet.node("a")
    fleet.node("b")
    placer = Placer(
        (deployment("x", replicas=1), deployment("y", replicas=3)), assign_timeout_s=TIMEOUT_S
    )
    out = placed(placer.reconcile(fleet.registry, now=0.0))
    assert sorted(out) == ["x-0", "y-0", "y-1", "y-2"]
    assert Counter(out.values()) == {"a": 2, "b": 2}
