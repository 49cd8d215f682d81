"""The fleet registry (fleet.coordinator.registry): nodes, engines and what may take traffic.

Plain synchronous tests: messages go in with an explicit ``now``, answers come out.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from fleet.coordinator.registry import EngineView, FleetRegistry, engine_tier
from fleet.protocol.messages import (
    CachedModelInfo,
    EngineStatus,
    FetchInfo,
    GpuInfo,
    Heartbeat,
    Register,
)

LOST_AFTER_S = 10.0


def gpu(index: int, *, healthy: bool = True) -> GpuInfo:
    return GpuInfo(
        index=index,
        uuid=f"GPU-{index}",
        name="H100",
        memory_total_bytes=80 << 30,
        memory_used_bytes=1 << 30,
        utilization_pct=12.5,
        temperature_c=40.0,
        power_w=100.0,
        ecc_uncorrected=0,
        healthy=healthy,
        xids=() if healthy else (79,),
        reason="" if healthy else "xid 79",
    )


def engine(engine_id: str, model: str = "m", state: str = "ready", **kw: Any) -> EngineStatus:
    return EngineStatus(
        engine_id=engine_id,
        model=model,
        url=f"http://127.0.0.1/{engine_id}",
        state=state,
        **kw,
    )


def register(node_id: str, *engines: EngineStatus, gpus: tuple[GpuInfo, ...] = ()) -> Register:
    return Register(
        node_id=node_id,
        agent_url=f"http://{node_id}:7000",
        agent_version="0.1",
        gpus=gpus,
        engines=engines,
    )


def heartbeat(
    node_id: str,
    *engines: EngineStatus,
    healthy: bool = True,
    seq: int = 1,
    gpus: tuple[GpuInfo, ...] = (),
) -> Heartbeat:
    return Heartbeat(node_id=node_id, seq=seq, healthy=healthy, gpus=gpus, engines=engines)


def test_register_records_the_node_and_its_engines() -> None:
    reg = FleetRegistry(lost_after_s=LOST_AFTER_S)
    record = reg.register(register("a", engine("e1"), gpus=(gpu(0),)), now=5.0)
    assert reg.node("a") is record
    assert (record.registered_at, record.last_seen) == (5.0, 5.0)
    assert record.healthy and not record.lost
    assert [r.node_id for r in reg.nodes()] == ["a"]
    assert [e.id for e in reg.engines()] == ["e1"]
    assert reg.node("missing") is None
    assert reg.engine("missing") is None


def test_heartbeat_updates_engines_gpus_health_and_last_seen() -> None:
    reg = FleetRegistry(lost_after_s=LOST_AFTER_S)
    reg.register(register("a", engine("e1"), gpus=(gpu(0),)), now=0.0)
    msg = Heartbeat(
        node_id="a",
        seq=1,
        healthy=False,
        gpus=(gpu(0, healthy=False), gpu(1)),
        engines=(engine("e2", state="starting"),),
    )
    assert reg.heartbeat(msg, now=3.0) is True
    record = reg.node("a")
    assert record is not None
    assert record.last_seen == 3.0
    assert record.registered_at == 0.0
    assert record.healthy is False
    assert [g.index for g in record.gpus] == [0, 1]
    assert list(record.engines) == ["e2"]
    assert [(e.id, e.state, e.routable) for e in reg.engines()] == [("e2", "starting", False)]


def test_heartbeat_from_unknown_node_returns_false_and_changes_nothing() -> None:
    reg = FleetRegistry(lost_after_s=LOST_AFTER_S)
    assert reg.heartbeat(heartbeat("ghost", engine("e1")), now=1.0) is False
    assert reg.nodes() == []
    assert reg.engines() == []


def test_expire_marks_lost_only_after_lost_after_s() -> None:
    reg = FleetRegistry(lost_after_s=LOST_AFTER_S)
    reg.register(register("a"), now=0.0)
    reg.register(register("b"), now=4.0)
    assert reg.expire(now=LOST_AFTER_S) == []  # exactly lost_after_s: still alive
    assert reg.expire(now=LOST_AFTER_S + 0.001) == ["a"]
    assert reg.expire(now=LOST_AFTER_S + 0.002) == []  # reported once
    assert reg.expire(now=14.0) == []
    assert reg.expire(now=14.5) == ["b"]
    assert [(r.node_id, r.lost) for r in reg.nodes()] == [("a", True), ("b", True)]
    assert reg.live_nodes() == []


def test_heartbeat_pushes_expiry_back() -> None:
    reg = FleetRegistry(lost_after_s=LOST_AFTER_S)
    reg.register(register("a"), now=0.0)
    assert reg.heartbeat(heartbeat("a"), now=8.0)
    assert reg.expire(now=17.0) == []
    assert reg.expire(now=18.0) == []
    assert reg.expire(now=18.5) == ["a"]


def test_lost_node_engines_are_unroutable_and_state_lost() -> None:
    reg = FleetRegistry(lost_after_s=LOST_AFTER_S)
    reg.register(register("a", engine("a1", model="x")), now=0.0)
    reg.register(register("b", engine("b1", model="x"), engine("b2", model="y")), now=5.0)
    assert [e.id for e in reg.routable("x")] == ["a1", "b1"]
    reg.expire(now=11.0)
    views = {e.id: e for e in reg.engines()}
    assert (views["a1"].state, views["a1"].routable) == ("lost", False)
    assert (views["b1"].state, views["b1"].routable) == ("ready", True)
    assert [e.id for e in reg.routable("x")] == ["b1"]
    assert [e.id for e in reg.routable()] == ["b1", "b2"]
    assert reg.models() == ["x", "y"]
    assert [r.node_id for r in reg.live_nodes()] == ["b"]
    reg.expire(now=16.0)
    assert reg.routable() == []
    assert reg.models() == []
    assert {e.id: e.state for e in reg.engines()} == {"a1": "lost", "b1": "lost", "b2": "lost"}


def test_an_engine_placed_again_is_looked_up_on_its_live_node() -> None:
    """A lost node's engine is placed again under the same id on another node: lookups by id
    must find the live one, whichever node sorts first (KV snapshots and health probes use it)."""
    reg = FleetRegistry(lost_after_s=LOST_AFTER_S)
    reg.register(register("a", engine("m-0")), now=0.0)
    reg.register(register("b"), now=5.0)
    reg.expire(now=11.0)  # a is lost
    assert reg.engine("m-0").state == "lost"  # type: ignore[union-attr]
    reg.heartbeat(heartbeat("b", engine("m-0")), now=11.5)
    found = reg.engine("m-0")
    assert found is not None and (found.node, found.state) == ("b", "ready")
    assert [(e.node, e.routable) for e in reg.engines()] == [("b", True), ("a", False)]


def test_lost_node_must_register_again() -> None:
    reg = FleetRegistry(lost_after_s=LOST_AFTER_S)
    reg.register(register("a", engine("e1")), now=0.0)
    reg.expire(now=20.0)
    assert reg.heartbeat(heartbeat("a", engine("e1")), now=21.0) is False
    assert reg.routable() == []
    reg.register(register("a", engine("e1")), now=22.0)
    assert [e.id for e in reg.routable()] == ["e1"]
    assert reg.heartbeat(heartbeat("a", engine("e1")), now=23.0) is True


def test_models_come_only_from_routable_engines() -> None:
    reg = FleetRegistry(lost_after_s=LOST_AFTER_S)
    reg.register(
        register(
            "a",
            engine("e1", model="ready-model"),
            engine("e2", model="starting-model", state="starting"),
            engine("e3", model="failed-model", state="failed"),
            engine("e4", model="ready-model"),
        ),
        now=0.0,
    )
    assert reg.models() == ["ready-model"]
    assert [e.id for e in reg.routable("ready-model")] == ["e1", "e4"]
    assert reg.routable("starting-model") == []
    assert [e.id for e in reg.engines()] == ["e1", "e2", "e3", "e4"]


def test_unhealthy_node_keeps_ready_engines_routable() -> None:
    # Node health feeds placement; an engine answering ready still takes traffic.
    reg = FleetRegistry(lost_after_s=LOST_AFTER_S)
    reg.register(register("a", engine("e1")), now=0.0)
    reg.heartbeat(heartbeat("a", engine("e1"), healthy=False), now=1.0)
    assert [e.id for e in reg.routable()] == ["e1"]


def test_re_register_replaces_the_record() -> None:
    reg = FleetRegistry(lost_after_s=LOST_AFTER_S)
    reg.register(register("a", engine("old1"), engine("old2")), now=0.0)
    reg.heartbeat(heartbeat("a", engine("old1"), healthy=False), now=1.0)
    reg.expire(now=12.0)
    record = reg.register(register("a", engine("new1"), gpus=(gpu(3),)), now=13.0)
    assert reg.node("a") is record
    assert (record.registered_at, record.last_seen) == (13.0, 13.0)
    assert record.healthy and not record.lost
    assert list(record.engines) == ["new1"]
    assert [e.id for e in reg.engines()] == ["new1"]
    assert list(reg.engine_ids()) == ["new1"]
    assert len(reg.nodes()) == 1


def test_forget_removes_the_node() -> None:
    reg = FleetRegistry(lost_after_s=LOST_AFTER_S)
    reg.register(register("a", engine("e1")), now=0.0)
    reg.register(register("b", engine("e2")), now=0.0)
    reg.forget("a")
    reg.forget("never-there")
    assert [r.node_id for r in reg.nodes()] == ["b"]
    assert list(reg.engine_ids()) == ["e2"]


def test_engine_lookup_and_sorting_across_nodes() -> None:
    reg = FleetRegistry(lost_after_s=LOST_AFTER_S)
    reg.register(register("z", engine("b")), now=0.0)
    reg.register(register("y", engine("c"), engine("a")), now=0.0)
    assert [e.id for e in reg.engines()] == ["a", "b", "c"]
    assert [r.node_id for r in reg.nodes()] == ["y", "z"]
    view = reg.engine("b")
    assert view is not None and view.node == "z"
    assert sorted(reg.engine_ids()) == ["a", "b", "c"]


def test_engine_view_as_json_shape() -> None:
    reg = FleetRegistry(lost_after_s=LOST_AFTER_S)
    status = engine(
        "e1", model="m", role="prefill", kind="sim", pid=42, restarts=2, gpus=(0, 1), block_size=16
    )
    reg.register(register("a", status), now=0.0)
    view = reg.engine("e1")
    assert isinstance(view, EngineView)
    data = view.as_json()
    assert data == {
        "id": "e1",
        "node": "a",
        "model": "m",
        "url": "http://127.0.0.1/e1",
        "pid": 42,
        "state": "ready",
        "role": "prefill",
        "kind": "sim",
        "restarts": 2,
        "block_size": 16,
        "gpus": [0, 1],
        "routable": True,
        "tier": "",  # the node reported no GPU readings
    }
    assert json.loads(json.dumps(data)) == data


def test_store_state_follows_register_and_heartbeats() -> None:
    reg = FleetRegistry(lost_after_s=LOST_AFTER_S)
    fetch = FetchInfo("hf://o/m", "downloading", 1, 4, rate_bps=1.5, eta_s=2.0)
    reg.register(replace(register("a"), fetches=(fetch,)), now=0.0)
    record = reg.node("a")
    assert record is not None and record.fetches == (fetch,)
    model = CachedModelInfo("hf://o/m", 4, pinned=False, last_used=3.0)
    assert reg.heartbeat(Heartbeat("a", 1, True, models=(model,)), now=1.0)
    assert (record.models, record.fetches) == ((model,), ())
    assert record.as_json()["models"] == [{"uri": "hf://o/m", "size_bytes": 4, "pinned": False}]


def test_node_record_as_json_shape() -> None:
    reg = FleetRegistry(lost_after_s=LOST_AFTER_S)
    record = reg.register(
        register("a", engine("e2"), engine("e1"), gpus=(gpu(0), gpu(1, healthy=False))), now=0.0
    )
    data = record.as_json()
    assert data == {
        "id": "a",
        "agent_url": "http://a:7000",
        "agent_version": "0.1",
        "healthy": True,
        "lost": False,
        "gpus": [
            {
                "index": 0,
                "uuid": "GPU-0",
                "name": "H100",
                "memory_total_bytes": 80 << 30,
                "memory_used_bytes": 1 << 30,
                "utilization_pct": 12.5,
                "temperature_c": 40.0,
                "power_w": 100.0,
                "ecc_uncorrected": 0,
                "healthy": True,
                "xids": [],
                "reason": "",
                "fake": False,
            },
            {
                "index": 1,
                "uuid": "GPU-1",
                "name": "H100",
                "memory_total_bytes": 80 << 30,
                "memory_used_bytes": 1 << 30,
                "utilization_pct": 12.5,
                "temperature_c": 40.0,
                "power_w": 100.0,
                "ecc_uncorrected": 0,
                "healthy": False,
                "xids": [79],
                "reason": "xid 79",
                "fake": False,
            },
        ],
        "engines": ["e1", "e2"],
        "models": [],
        "fetches": [],
    }
    assert json.loads(json.dumps(data)) == data
    reg.expire(now=LOST_AFTER_S + 1)
    assert record.as_json()["lost"] is True


def test_two_copies_of_an_engine_route_to_the_ready_one_on_healthy_gpus() -> None:
    """An engine being moved off an unhealthy GPU runs on two nodes under one id: lookups and
    routing see one copy, the old one until the new one is ready, then the new one."""
    reg = FleetRegistry(lost_after_s=LOST_AFTER_S)
    reg.register(register("a", engine("m-0", gpus=(0,)), gpus=(gpu(0, healthy=False),)), 0.0)
    reg.register(register("b", engine("m-0", state="starting", gpus=(1,)), gpus=(gpu(1),)), 0.0)

    assert [(e.id, e.node) for e in reg.routable("m")] == [("m-0", "a")]
    view = reg.engine("m-0")
    assert view is not None and view.node == "a"
    assert len(reg.engines()) == 2  # both copies are listed

    reg.heartbeat(heartbeat("b", engine("m-0", gpus=(1,)), gpus=(gpu(1),)), 1.0)
    assert [(e.id, e.node) for e in reg.routable("m")] == [("m-0", "b")]
    assert reg.models() == ["m"]
    view = reg.engine("m-0")
    assert view is not None and view.node == "b"


def test_an_engines_tier_comes_from_its_gpus_names() -> None:
    def gpu(index: int, name: str) -> GpuInfo:
        return GpuInfo(index, f"u{index}", name, 1, 0, 0.0, 0.0, 0.0, 0, True)

    gpus = [gpu(0, "NVIDIA H100 80GB HBM3"), gpu(1, "NVIDIA L4"), gpu(2, "Fake NVIDIA L4 24GiB")]
    assert engine_tier(gpus, (0,)) == "h100"
    assert engine_tier(gpus, (1, 2)) == "l4"
    assert engine_tier(gpus, (0, 1)) == "h100+l4"
    assert engine_tier(gpus, ()) == "" and engine_tier(gpus, (7,)) == ""


def test_views_kept_between_changes_follow_every_change() -> None:
    """The views are built once per change: each kind of change shows in the next answer, and
    a caller changing a list it got changes nothing."""
    reg = FleetRegistry(lost_after_s=LOST_AFTER_S)
    reg.register(register("a", engine("e1"), engine("e2", model="other")), now=0.0)
    assert [e.id for e in reg.routable("m")] == ["e1"]
    reg.routable("m").clear()
    reg.engines().clear()
    assert [e.id for e in reg.routable("m")] == ["e1"]
    assert [e.id for e in reg.engines()] == ["e1", "e2"]
    reg.heartbeat(heartbeat("a", engine("e1", state="starting"), engine("e2", model="other")), 1.0)
    assert reg.routable("m") == [] and [e.id for e in reg.routable()] == ["e2"]
    reg.register(register("b", engine("e3")), now=2.0)
    assert [e.id for e in reg.routable("m")] == ["e3"]
    assert reg.expire(now=2.0 + LOST_AFTER_S + 1) == ["a", "b"]
    assert reg.routable() == [] and reg.engine("e3") is not None
    assert not reg.engine("e3").routable  # type: ignore[union-attr]
    reg.forget("b")
    assert reg.engine("e3") is None and [e.id for e in reg.engines()] == ["e1", "e2"]
