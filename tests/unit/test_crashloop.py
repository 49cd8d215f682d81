"""Crash loops (fleet.coordinator.crashloop): an engine that keeps restarting on one node moves."""

from __future__ import annotations

import pytest

from fleet.coordinator.crashloop import CrashLoops
from fleet.coordinator.deployment import Deployment
from fleet.coordinator.placement import Placer
from fleet.coordinator.registry import FleetRegistry
from fleet.protocol.errors import ConfigError
from fleet.protocol.messages import EngineStatus, Heartbeat, Register


def report(registry: FleetRegistry, node: str, restarts: int | None, now: float) -> None:
    if registry.node(node) is None:
        registry.register(Register(node, "", "0", ()), now)
    engines = () if restarts is None else (
        EngineStatus("m-0", "m", "http://127.0.0.1:1", "starting", restarts=restarts),
    )  # fmt: skip
    registry.heartbeat(Heartbeat(node, 1, True, (), engines), now)


def test_restarts_within_the_window_make_a_loop_and_only_then() -> None:
    registry = FleetRegistry(lost_after_s=1e9)
    report(registry, "b", None, 0.0)
    loops = CrashLoops(limit=3, window_s=60)
    for now, restarts in ((0.0, 0), (10.0, 1), (20.0, 2)):
        report(registry, "a", restarts, now)
        loops.observe(registry, now)
    assert loops.to_move(registry, 20.0) == []  # 2 restarts: not yet
    report(registry, "a", 3, 30.0)
    loops.observe(registry, 30.0)
    assert loops.to_move(registry, 30.0) == [("a", "m-0")]
    assert loops.to_move(registry, 71.0) == []  # the first restart (t=10) left the window


def test_a_loop_with_nowhere_else_to_go_stays() -> None:
    registry = FleetRegistry(lost_after_s=1e9)
    loops = CrashLoops(limit=2, window_s=60)
    for now, restarts in ((0.0, 0), (1.0, 1), (2.0, 2)):
        report(registry, "a", restarts, now)
        loops.observe(registry, now)
    assert loops.to_move(registry, 2.0) == []  # no other node


def test_a_moved_engine_is_placed_on_another_node_while_the_old_one_is_avoided() -> None:
    registry = FleetRegistry(lost_after_s=1e9)
    report(registry, "a", None, 0.0)
    report(registry, "b", None, 0.0)
    placer = Placer((Deployment("m", "/m"),), assign_timeout_s=30)
    placer.crash_loops = CrashLoops(limit=2, window_s=60)
    placer.crash_loops.moved("a", "m-0", now=0.0)
    assert placer.crash_loops.avoided("m-0", 10.0) == {"a"}
    (placement,) = placer.reconcile(registry, now=10.0)  # "a" sorts first, but is avoided
    assert placement.node_id == "b"
    assert placer.crash_loops.avoided("m-0", 60.0) == frozenset()  # for window_s only


def test_an_avoided_node_is_still_used_when_no_other_node_can_run_the_engine() -> None:
    registry = FleetRegistry(lost_after_s=1e9)
    report(registry, "a", None, 0.0)
    placer = Placer((Deployment("m", "/m"),), assign_timeout_s=30)
    placer.crash_loops.moved("a", "m-0", now=0.0)
    (placement,) = placer.reconcile(registry, now=1.0)
    assert placement.node_id == "a"


@pytest.mark.parametrize("bad", [{"limit": 0}, {"window_s": 0.0}])
def test_bad_settings_are_rejected(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        CrashLoops(**bad)  # type: ignore[arg-type]
