"""Placement (fleet.coordinator.placement): which node runs which engine.

A real :class:`FleetRegistry` is fed Register/Heartbeat messages with explicit ``now``; the
tests assert the assignments :meth:`Placer.reconcile` returns and what it returns next.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import pytest

from fleet.coordinator.deployment import Deployment
from fleet.coordinator.gpumemory import EngineMemory
from fleet.coordinator.placement import Placement, Placer
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


# -- Moves off unhealthy GPUs (make-before-break) ----------------------------------------------


def ready(engine_id: str, *, gpus: tuple[int, ...] = ()) -> EngineStatus:
    return EngineStatus(engine_id=engine_id, model="m", url="http://e", state="ready", gpus=gpus)


def two_gpu_nodes(fleet: Fleet, *, bad: tuple[str, int] | None = None, now: float = 0.0) -> None:
    """Nodes a and b with GPUs 0 and 1 each, one of them unhealthy if ``bad`` says so."""
    for node_id in ("a", "b"):
        gpus = tuple(gpu(i, healthy=(node_id, i) != bad) for i in (0, 1))
        record = fleet.registry.node(node_id)
        engines = list(record.engines.values()) if record is not None else []
        if record is None:
            fleet.node(node_id, gpus=gpus, now=now)
        hb = Heartbeat(node_id=node_id, seq=2, healthy=True, gpus=gpus, engines=tuple(engines))
        assert fleet.registry.heartbeat(hb, now)


def moving_fleet() -> tuple[Fleet, Placer]:
    """m-0 on a's GPU 0 and m-1 on b's GPU 0, both ready; then a's GPU 0 turns unhealthy."""
    fleet = Fleet()
    two_gpu_nodes(fleet)
    placer = Placer((deployment("m", replicas=2, gpus_per_engine=1),), assign_timeout_s=TIMEOUT_S)
    first = placer.reconcile(fleet.registry, now=0.0)
    assert {(p.node_id, p.assign.spec.gpus) for p in first} == {("a", (0,)), ("b", (0,))}
    fleet.report("a", ready("m-0", gpus=(0,)), now=1.0)
    fleet.report("b", ready("m-1", gpus=(0,)), now=1.0)
    two_gpu_nodes(fleet, bad=("a", 0), now=2.0)
    return fleet, placer


def test_an_engine_on_an_unhealthy_gpu_gets_a_copy_on_another_node() -> None:
    fleet, placer = moving_fleet()

    out = placer.reconcile(fleet.registry, now=2.0)

    assert [(p.node_id, p.assign.spec.engine_id, p.assign.spec.gpus) for p in out] == [
        ("b", "m-0", (1,))
    ]
    # Only the engine on the bad GPU moves; nothing is stopped before the copy is ready.
    assert placer.reconcile(fleet.registry, now=3.0) == []
    assert placer.surplus(fleet.registry) == []
    assert placer.relocate(fleet.registry, now=3.0) == []


def test_the_old_copy_stops_only_once_the_new_one_is_ready() -> None:
    fleet, placer = moving_fleet()
    placer.reconcile(fleet.registry, now=2.0)
    starting = EngineStatus("m-0", "m", "http://new", state="starting", gpus=(1,))
    fleet.report("b", ready("m-1", gpus=(0,)), starting, now=3.0)
    fleet.report("a", ready("m-0", gpus=(0,)), now=3.0)  # heartbeats keep the GPU readings
    two_gpu_nodes(fleet, bad=("a", 0), now=3.0)

    assert placer.reconcile(fleet.registry, now=3.0) == []  # the copy runs: nothing pending
    assert placer.pending() == {}
    assert placer.surplus(fleet.registry) == []  # the old copy still serves
    view = fleet.registry.engine("m-0")
    assert view is not None and view.node == "a"

    fleet.report("b", ready("m-1", gpus=(0,)), ready("m-0", gpus=(1,)), now=4.0)
    two_gpu_nodes(fleet, bad=("a", 0), now=4.0)
    assert placer.surplus(fleet.registry) == [("a", "m-0")]
    view = fleet.registry.engine("m-0")
    assert view is not None and view.node == "b"

    fleet.report("a", now=5.0)  # the old copy stopped
    two_gpu_nodes(fleet, bad=("a", 0), now=5.0)
    assert placer.reconcile(fleet.registry, now=5.0) == []
    assert placer.surplus(fleet.registry) == []


def test_an_old_copy_that_is_not_ready_stops_at_once() -> None:
    fleet, placer = moving_fleet()
    placer.reconcile(fleet.registry, now=2.0)
    broken = EngineStatus("m-0", "m", "http://old", state="backoff", gpus=(0,))
    fleet.report("a", broken, now=3.0)
    starting = EngineStatus("m-0", "m", "http://new", state="starting", gpus=(1,))
    fleet.report("b", ready("m-1", gpus=(0,)), starting, now=3.0)
    two_gpu_nodes(fleet, bad=("a", 0), now=3.0)

    assert placer.surplus(fleet.registry) == [("a", "m-0")]


def test_a_healthy_engine_is_never_moved() -> None:
    fleet, placer = moving_fleet()
    # b's idle GPU 1 turns unhealthy: m-1 runs on GPU 0 and stays.
    two_gpu_nodes(fleet, bad=("b", 1), now=2.0)
    assert placer.reconcile(fleet.registry, now=2.0) == []
    assert placer.relocate(fleet.registry, now=2.0) == []
    assert placer.surplus(fleet.registry) == []


def test_a_copy_that_fails_to_appear_is_resent_and_a_lost_target_is_replaced() -> None:
    fleet, placer = moving_fleet()
    assert placed(placer.reconcile(fleet.registry, now=2.0)) == {"m-0": "b"}
    again = placer.reconcile(fleet.registry, now=2.0 + TIMEOUT_S)
    assert placed(again) == {"m-0": "b"}  # b may have missed it


def test_no_room_elsewhere_moves_the_engine_on_its_own_node_break_before_make() -> None:
    """Ids are unique on a node, so the old copy stops first; it is placed again on a's free
    healthy GPU once a no longer reports it."""
    fleet = Fleet()
    fleet.node("a", ready("m-0", gpus=(0,)), gpus=(gpu(0, healthy=False), gpu(1)))
    placer = Placer((deployment("m", gpus_per_engine=1),), assign_timeout_s=TIMEOUT_S)

    assert placer.reconcile(fleet.registry, now=0.0) == []  # no other node
    assert placer.relocate(fleet.registry, now=0.0) == [("a", "m-0")]
    fleet.report("a", now=1.0)
    out = placer.reconcile(fleet.registry, now=1.0)
    assert [(p.node_id, p.assign.spec.gpus) for p in out] == [("a", (1,))]


def test_no_healthy_gpu_anywhere_leaves_the_engine_where_it_is() -> None:
    fleet = Fleet()
    fleet.node("a", ready("m-0", gpus=(0,)), gpus=(gpu(0, healthy=False),))
    fleet.node("b", ready("x-0", gpus=(0,)), gpus=(gpu(0),))
    placer = Placer((deployment("m", gpus_per_engine=1),), assign_timeout_s=TIMEOUT_S)

    assert placer.reconcile(fleet.registry, now=0.0) == []
    assert placer.relocate(fleet.registry, now=0.0) == []
    assert placer.surplus(fleet.registry) == []
    view = fleet.registry.engine("m-0")
    assert view is not None and view.routable  # it keeps serving


def test_a_lost_node_that_comes_back_keeps_serving_until_the_kept_copy_is_ready() -> None:
    fleet = Fleet()
    fleet.node("a")
    fleet.node("b")
    placer = Placer((deployment("m"),), assign_timeout_s=TIMEOUT_S)
    assert placed(placer.reconcile(fleet.registry, now=0.0)) == {"m-0": "a"}
    fleet.report("a", ready("m-0"), now=1.0)
    fleet.report("b", now=9.0)
    fleet.registry.expire(now=11.5)
    assert placed(placer.reconcile(fleet.registry, now=11.5)) == {"m-0": "b"}
    fleet.report("b", status("m-0"), now=12.0)  # starting
    fleet.node("a", ready("m-0"), now=12.0)  # a is back, its copy ready

    assert placer.surplus(fleet.registry) == []
    fleet.report("b", ready("m-0"), now=13.0)
    assert placer.surplus(fleet.registry) == [("a", "m-0")]


# -- GPU memory ----------------------------------------------------------------------------------


def sized(index: int, total_gib: int, used_gib: int = 0) -> GpuInfo:
    return dataclasses.replace(
        gpu(index), memory_total_bytes=total_gib << 30, memory_used_bytes=used_gib << 30
    )


def needing(gib_per_gpu: int, utilization: float = 0.9) -> EngineMemory:
    return EngineMemory(weight_bytes=gib_per_gpu << 30, kv_bytes=0, activation_bytes=0,
                        graph_bytes=0, context_bytes=0, utilization=utilization)  # fmt: skip


def test_an_engine_goes_to_a_gpu_its_memory_fits_the_tightest_first() -> None:
    fleet = Fleet()
    fleet.node("a", gpus=(sized(0, 24), sized(1, 24)))
    fleet.node("b", gpus=(sized(0, 80), sized(1, 48)))
    big = deployment("big", gpus_per_engine=1, memory=needing(38))
    placer = Placer((big,), assign_timeout_s=TIMEOUT_S)
    (placement,) = placer.reconcile(fleet.registry, now=0.0)
    # a's 24 GiB GPUs are too small; of b's, the 48 GiB one is the tightest fit
    assert placement.node_id == "b" and placement.assign.spec.gpus == (1,)


def test_memory_in_use_counts_and_no_fit_says_what_is_free() -> None:
    fleet = Fleet()
    fleet.node("a", gpus=(sized(0, 80, used_gib=60), sized(1, 24)))
    big = deployment("big", gpus_per_engine=1, memory=needing(38))
    placer = Placer((big,), assign_timeout_s=TIMEOUT_S)
    assert placer.reconcile(fleet.registry, now=0.0) == []
    assert placer.why_unplaced(big, fleet.registry, now=0.0) == (
        "needs 1 × 38 GiB GPU; largest free: node a 1 × 24 GiB + 1 × 20 GiB"
    )


# -- the choice of GPUs: tiers, real before fake, spread -----------------------------------------


def named(index: int, name: str, *, fake: bool = False) -> GpuInfo:
    return dataclasses.replace(gpu(index), name=name, fake=fake)


def test_a_deployment_gets_its_preferred_tier_first_then_any_other() -> None:
    fleet = Fleet()
    fleet.node("a", gpus=(named(0, "NVIDIA H100 80GB HBM3"),))
    fleet.node("b", gpus=(named(0, "NVIDIA A100-SXM4-80GB"),))
    d = deployment("m", replicas=2, gpus_per_engine=1, tiers=("a100",))
    out = Placer((d,), assign_timeout_s=TIMEOUT_S).reconcile(fleet.registry, now=0.0)
    # m-0 takes the only A100; the tier is a preference, so m-1 still runs, on the H100
    assert placed(out) == {"m-0": "b", "m-1": "a"}


def test_real_gpus_are_used_before_fake_ones() -> None:
    fleet = Fleet()
    fleet.node("a", gpus=(named(0, "H100", fake=True), named(1, "H100", fake=True)))
    fleet.node("b", gpus=(named(0, "H100"),))
    d = deployment("m", replicas=2, gpus_per_engine=1)
    out = Placer((d,), assign_timeout_s=TIMEOUT_S).reconcile(fleet.registry, now=0.0)
    assert placed(out) == {"m-0": "b", "m-1": "a"}


def test_gpu_replicas_of_one_deployment_spread_over_nodes() -> None:
    fleet = Fleet()
    fleet.node("a", gpus=tuple(gpu(i) for i in range(4)))
    fleet.node("b", gpus=tuple(gpu(i) for i in range(4)))
    d = deployment("m", replicas=4, gpus_per_engine=1)
    out = Placer((d,), assign_timeout_s=TIMEOUT_S).reconcile(fleet.registry, now=0.0)
    assert Counter(placed(out).values()) == {"a": 2, "b": 2}
    # an engine of one node's GPUs only: two GPUs each, on one node
    pair = deployment("p", gpus_per_engine=2)
    fleet.node("c", gpus=(gpu(0),))
    fleet.node("d", gpus=(gpu(0), gpu(1)))
    (only,) = Placer((pair,), assign_timeout_s=TIMEOUT_S).reconcile(fleet.registry, now=0.0)
    assert only.node_id in ("a", "b", "d") and len(set(only.assign.spec.gpus)) == 2


def test_serving_keeps_no_entry_for_names_nothing_serves() -> None:
    placer = Placer((), assign_timeout_s=30)
    for i in range(100):
        assert placer.serving(f"no-such-model-{i}") == []
    assert placer._serving == {}  # a client's made-up names do not grow the cache
