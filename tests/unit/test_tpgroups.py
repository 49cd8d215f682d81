"""Tensor-parallel groups (fleet.coordinator.tpgroups) and their routing (registry), sans-I/O.

A real :class:`FleetRegistry` is fed Register/Heartbeat messages with explicit ``now``; the tests
play the agents' part (report what was assigned, in the states a test needs) and assert the
messages :meth:`TPGroups.reconcile` returns and what the registry routes.
"""

from __future__ import annotations

import dataclasses

from fleet.coordinator.deployment import Deployment
from fleet.coordinator.placement import Placer
from fleet.coordinator.registry import FleetRegistry
from fleet.coordinator.tpgroups import Send, TPGroups
from fleet.protocol.messages import (
    AssignEngine,
    EngineSpec,
    EngineStatus,
    GpuInfo,
    Heartbeat,
    Register,
    UnassignEngine,
)

TIMEOUT_S = 30.0


def gpu(index: int) -> GpuInfo:
    return GpuInfo(index, f"GPU-{index}", "H100", 80 << 30, 0, 0.0, 30.0, 70.0, 0, True)


class World:
    """A registry, TPGroups, and agents that run what they are told."""

    def __init__(self, *nodes: str, gpus: int = 0) -> None:
        self.registry = FleetRegistry(lost_after_s=10)
        self.groups = TPGroups(assign_timeout_s=TIMEOUT_S)
        self.running: dict[str, dict[str, EngineStatus]] = {n: {} for n in nodes}
        self.ports = iter(range(29500, 29600))
        for n in nodes:
            msg = Register(n, "", "0", gpus=tuple(gpu(i) for i in range(gpus)))
            self.registry.register(msg, 0.0)

    def report(self, now: float) -> None:
        for node, engines in self.running.items():
            record = self.registry.node(node)
            if record is not None and not record.lost:
                hb = Heartbeat(node, 1, True, record.gpus, tuple(engines.values()))
                self.registry.heartbeat(hb, now)

    def step(self, d: Deployment, now: float, state: str = "starting") -> list[Send]:
        """Reconcile, then let each agent act on what it got (as ``state``) and report."""
        sent = self.groups.reconcile((d,), self.registry, now)
        for s in sent:
            engines = self.running[s.node_id]
            if isinstance(s.message, AssignEngine):
                engines[s.message.spec.engine_id] = self.launch(s.message.spec, state)
            else:
                engines.pop(s.message.engine_id, None)
        self.report(now)
        return sent

    def launch(self, spec: EngineSpec, state: str) -> EngineStatus:
        if spec.nnodes > 1 and spec.node_rank == 0 and not spec.master_port:
            spec = dataclasses.replace(spec, master_addr="10.0.0.1", master_port=next(self.ports))
        return EngineStatus(
            spec.engine_id, spec.model, "http://x", state, gpus=spec.gpus, group=spec.group,
            node_rank=spec.node_rank, nnodes=spec.nnodes, master_addr=spec.master_addr,
            master_port=spec.master_port,
        )  # fmt: skip

    def set_state(self, engine_id: str, state: str, now: float) -> None:
        for engines in self.running.values():
            if engine_id in engines:
                engines[engine_id] = dataclasses.replace(engines[engine_id], state=state)
        self.report(now)

    def routable(self) -> list[str]:
        return [e.id for e in self.registry.routable()]


def tp2(**kw: object) -> Deployment:
    return Deployment(model="demo", model_path="/m", name="tp", tensor_parallel_size=2, **kw)  # type: ignore[arg-type]


def test_a_cpu_group_spreads_rank_0_first_then_rank_1_with_its_rendezvous() -> None:
    w = World("a", "b")
    first = w.step(tp2(), 1.0)
    assert [(s.node_id, s.message.spec.engine_id) for s in first] == [("a", "tp-0")]  # type: ignore[union-attr]
    head = first[0].message.spec  # type: ignore[union-attr]
    assert (head.nnodes, head.node_rank, head.master_port, head.group) == (2, 0, 0, "tp-0")
    second = w.step(tp2(), 2.0)
    assert len(second) == 1 and second[0].node_id == "b"
    rank1 = second[0].message.spec  # type: ignore[union-attr]
    assert (rank1.engine_id, rank1.node_rank, rank1.master_addr) == ("tp-0.rank1", 1, "10.0.0.1")
    assert rank1.master_port == w.running["a"]["tp-0"].master_port
    assert w.step(tp2(), 3.0) == []  # nothing more to do while it starts
    assert w.routable() == []
    w.set_state("tp-0", "ready", 4.0)  # rank 0 alone never routes
    assert w.routable() == []
    w.set_state("tp-0.rank1", "ready", 5.0)
    assert w.routable() == ["tp-0"]  # rank 0's id; rank 1 never routes


def test_a_dead_rank_tears_the_whole_group_down_and_it_is_placed_again() -> None:
    w = World("a", "b")
    for t in (1.0, 2.0):
        w.step(tp2(), t)
    w.set_state("tp-0", "ready", 3.0)
    w.set_state("tp-0.rank1", "ready", 3.0)
    old_port = w.running["a"]["tp-0"].master_port
    w.set_state("tp-0.rank1", "failed", 4.0)  # rank 0 still says ready: not trusted
    assert w.routable() == []
    down = w.step(tp2(), 5.0)
    assert sorted((s.node_id, s.message.engine_id) for s in down) == [  # type: ignore[union-attr]
        ("a", "tp-0"),
        ("b", "tp-0.rank1"),
    ]
    assert all(isinstance(s.message, UnassignEngine) for s in down)
    assert w.groups.teardowns == 1
    again = w.step(tp2(), 6.0)  # both gone: placed anew, rank 0 first
    assert [s.message.spec.engine_id for s in again] == ["tp-0"]  # type: ignore[union-attr]
    w.step(tp2(), 7.0)
    assert w.running["b"]["tp-0.rank1"].master_port not in (0, old_port)  # fresh rendezvous


def test_a_lost_node_or_a_vanished_rank_breaks_the_group() -> None:
    w = World("a", "b", "c")
    for t in (1.0, 2.0, 2.5):  # at 2.5 the coordinator has seen rank 1 reported
        w.step(tp2(), t)
    (rank1_node,) = [n for n, e in w.running.items() if "tp-0.rank1" in e]
    w.running[rank1_node].clear()  # its agent restarted: the rank is gone
    w.report(3.0)
    down = w.step(tp2(), 3.0)  # every assigned rank is told, reported or not
    assert [s.message.engine_id for s in down] == ["tp-0", "tp-0.rank1"]  # type: ignore[union-attr]
    assert w.groups.teardowns == 1

    w = World("a", "b")
    for t in (1.0, 2.0):
        w.step(tp2(), t)
    w.report(12.0)
    w.running["a"]["tp-0"] = dataclasses.replace(w.running["a"]["tp-0"], state="ready")
    w.registry.node("b").last_seen = 0.0  # type: ignore[union-attr]
    assert w.registry.expire(12.0) == ["b"]
    down = w.step(tp2(), 12.0)
    assert [(s.node_id, s.message.engine_id) for s in down] == [  # type: ignore[union-attr]
        ("a", "tp-0"),
        ("b", "tp-0.rank1"),  # told too, in case its link comes back
    ]
    assert w.routable() == []


def test_gpu_groups_pack_on_one_node_when_it_has_the_gpus() -> None:
    w = World("a", "b", gpus=2)
    sent = w.step(tp2(gpus_per_engine=2), 1.0)
    spec = sent[0].message.spec  # type: ignore[union-attr]
    assert (spec.nnodes, spec.gpus, spec.tensor_parallel_size) == (1, (0, 1), 2)
    w.set_state("tp-0", "ready", 2.0)
    assert w.routable() == ["tp-0"]
    w = World("a", "b", gpus=1)  # no node has two: one rank per node, one GPU each
    sent = w.step(tp2(gpus_per_engine=2), 1.0)
    spec = sent[0].message.spec  # type: ignore[union-attr]
    assert (spec.nnodes, spec.gpus) == (2, (0,))


def test_too_few_nodes_places_nothing_and_says_why() -> None:
    w = World("a")
    assert w.step(tp2(), 1.0) == []
    assert "needs 2 healthy nodes" in w.groups.why_unplaced(tp2(), w.registry)


def test_the_placer_leaves_groups_and_their_ranks_alone() -> None:
    w = World("a", "b")
    placer = Placer((tp2(),), assign_timeout_s=TIMEOUT_S)
    for t in (1.0, 2.0):
        w.step(tp2(), t)
    assert placer.reconcile(w.registry, 3.0) == []
    assert placer.unwanted(w.registry, 3.0) == []  # rank 1's id is owned by the deployment


def test_a_restarted_coordinator_adopts_a_whole_group_and_tears_down_a_partial_one() -> None:
    w = World("a", "b")
    for t in (1.0, 2.0):
        w.step(tp2(), t)
    w.groups = TPGroups(assign_timeout_s=TIMEOUT_S)  # a new coordinator, same nodes
    assert w.step(tp2(), 3.0) == []
    w.groups = TPGroups(assign_timeout_s=TIMEOUT_S)
    w.running["b"].clear()
    w.report(4.0)
    down = w.step(tp2(), 4.0)
    assert [(s.node_id, s.message.engine_id) for s in down] == [("a", "tp-0")]  # type: ignore[union-attr]


def test_a_gpu_turning_unhealthy_moves_the_group_off_it() -> None:
    w = World("a", "b", gpus=2)
    d = tp2(gpus_per_engine=2)
    w.step(d, 1.0)
    w.set_state("tp-0", "ready", 2.0)
    (packed,) = [n for n, e in w.running.items() if "tp-0" in e]
    record = w.registry.node(packed)
    assert record is not None
    bad = dataclasses.replace(record.gpus[1], healthy=False, xids=(79,), reason="XID 79")
    w.registry.heartbeat(
        Heartbeat(packed, 2, True, (record.gpus[0], bad), tuple(w.running[packed].values())), 3.0
    )
    down = w.step(d, 3.0)
    assert [(s.node_id, s.message.engine_id) for s in down] == [(packed, "tp-0")]  # type: ignore[union-attr]
    assert w.groups.teardowns == 1
    assert w.groups.group("tp-0").reason == f"rank 0's GPU {packed}:1 is unhealthy: XID 79"  # type: ignore[union-attr]
    again = w.step(d, 4.0)  # placed anew where two healthy GPUs are
    other = "b" if packed == "a" else "a"
    assert [(s.node_id, s.message.spec.gpus) for s in again] == [(other, (0, 1))]  # type: ignore[union-attr]
