"""The node scaler (fleet.coordinator.nodescale) and what it scales for (Placer.gpu_shortfall).

A real registry fed Register/Heartbeat messages, a real Placer and TPGroups; the scaler is
called over virtual time with plain calls.
"""

from __future__ import annotations

import pytest

from fleet.coordinator.deployment import Deployment
from fleet.coordinator.nodescale import (
    NodeScaleConfig,
    NodeScaler,
    ScaleTarget,
    idle_nodes,
    nodes_for,
)
from fleet.coordinator.placement import Placer
from fleet.coordinator.shortfall import GpuShortfall
from fleet.coordinator.tpgroups import TPGroups
from fleet.protocol.errors import ConfigError
from fleet.protocol.messages import GpuInfo

from .test_placement import Fleet, gpu, status

TARGET = ScaleTarget("cluster.x-k8s.io", "v1beta1", "machinedeployments", "default", "gpu")
CFG = NodeScaleConfig(TARGET, gpus_per_node=4, min_nodes=1, max_nodes=5, cooldown_s=300,
                      idle_s=600)  # fmt: skip


def short(engine_id: str, *layouts: tuple[int, ...]) -> GpuShortfall:
    return GpuShortfall(engine_id, engine_id.rsplit("-", 1)[0], layouts)


def gpus(n: int) -> tuple[GpuInfo, ...]:
    return tuple(gpu(i) for i in range(n))


# -- what placement lacks GPUs for ---------------------------------------------------------


def test_shortfall_is_what_no_node_has_the_free_gpus_for() -> None:
    fleet = Fleet()
    fleet.node("a", status("big-0", model="big", gpus=(0, 1)), gpus=gpus(4))
    big = Deployment(model="big", model_path="/m", replicas=3, gpus_per_engine=2)
    cpu = Deployment(model="cpu", model_path="/m", replicas=5)
    placer = Placer((big, cpu), assign_timeout_s=30)
    # big-0 runs; big-1 fits a's two free GPUs; big-2 fits nowhere; CPU engines never lack GPUs.
    assert placer.gpu_shortfall(fleet.registry, 1.0) == [GpuShortfall("big-2", "big", ((2,),))]
    placed = placer.reconcile(fleet.registry, 1.0)
    assert {p.assign.spec.engine_id for p in placed} >= {"big-1"}
    # big-1 is assigned, not reported yet: it holds its GPUs, and is not short itself.
    assert [s.engine_id for s in placer.gpu_shortfall(fleet.registry, 2.0)] == ["big-2"]


def test_no_shortfall_while_settling_and_unhealthy_gpus_count_as_missing() -> None:
    fleet = Fleet()
    fleet.node("a", gpus=(gpu(0), gpu(1, healthy=False)))
    d = Deployment(model="m", model_path="/m", replicas=1, gpus_per_engine=2)
    placer = Placer((d,), assign_timeout_s=30, settle_until=10.0)
    assert placer.gpu_shortfall(fleet.registry, 5.0) == []
    assert placer.gpu_shortfall(fleet.registry, 10.0) == [GpuShortfall("m-0", "m", ((2,),))]


def test_tensor_parallel_groups_not_placed_are_short_in_their_layouts() -> None:
    fleet = Fleet()
    fleet.node("a", gpus=gpus(2))
    fleet.node("b", gpus=gpus(2))
    auto = Deployment(model="tp", model_path="/m", tensor_parallel_size=2, gpus_per_engine=4)
    pack = Deployment(model="pk", model_path="/m", tensor_parallel_size=2, gpus_per_engine=4,
                      tp_layout="pack")  # fmt: skip
    groups = TPGroups(assign_timeout_s=30)
    placer = Placer((auto, pack), assign_timeout_s=30)
    # tp-0 spreads over a and b (2 + 2); pk-0 must pack 4 on one node: short.
    assert placer.gpu_shortfall(fleet.registry, 1.0, groups) == [
        GpuShortfall("pk-0", "pk", ((4,),))
    ]
    assert placer.gpu_shortfall(fleet.registry, 1.0) == []  # without TPGroups: not judged
    groups.reconcile((auto,), fleet.registry, 1.0)  # tp-0 placed: it holds a's and b's GPUs
    wider = Deployment(model="tp", model_path="/m", tensor_parallel_size=2, gpus_per_engine=4,
                       replicas=2)  # fmt: skip
    placer.replace((wider,))
    assert placer.gpu_shortfall(fleet.registry, 2.0, groups) == [
        GpuShortfall("tp-1", "tp", ((4,), (2, 2)))
    ]


# -- nodes for a shortfall -------------------------------------------------------------------


def test_nodes_for_packs_engines_first_fit_largest_first() -> None:
    assert nodes_for([short("a-0", (2,)), short("a-1", (2,)), short("a-2", (2,))], 4) == (2, [])
    assert nodes_for([short("b-0", (3,)), short("c-0", (1,)), short("c-1", (1,))], 4) == (2, [])
    # ceil(15 / 8) would be 2, but a 5-GPU engine needs a node of its own: 3.
    assert nodes_for([short(f"f-{i}", (5,)) for i in range(3)], 8) == (3, [])
    assert nodes_for([short("huge-0", (8,))], 4) == (0, ["huge-0"])
    # A spread group's ranks go to distinct nodes; auto packs when a node is large enough.
    assert nodes_for([short("s-0", (2, 2))], 4) == (2, [])
    assert nodes_for([short("t-0", (8,), (4, 4))], 4) == (2, [])
    assert nodes_for([short("t-0", (8,), (4, 4))], 8) == (1, [])


# -- decisions over time ---------------------------------------------------------------------


def test_scales_up_at_once_by_what_fits_the_shortfall_then_waits_out_the_cooldown() -> None:
    scaler = NodeScaler(CFG)
    need = [short("m-0", (4,)), short("m-1", (2,)), short("m-2", (2,))]
    d = scaler.decide(0.0, replicas=1, short=need, idle=())
    assert (d.direction, d.current, d.wanted) == ("up", 1, 3)
    assert d.short_gpus == 8 and d.short == ("m-0", "m-1", "m-2")
    assert "2 more nodes of 4 GPUs" in d.reason
    scaler.applied(d, 0.0)
    d = scaler.decide(299.0, replicas=3, short=need, idle=())  # not joined yet: no second ask
    assert (d.direction, d.wanted) == ("hold", 3) and "1 s more to join" in d.reason
    d = scaler.decide(300.0, replicas=3, short=need[:1], idle=())  # still short: ask again
    assert (d.direction, d.wanted) == ("up", 4)


def test_never_above_max_and_up_to_min_at_once() -> None:
    scaler = NodeScaler(CFG)
    d = scaler.decide(0.0, replicas=4, short=[short("m-0", (4,)), short("m-1", (4,))], idle=())
    assert (d.direction, d.wanted) == ("up", 5)
    d = scaler.decide(0.0, replicas=5, short=[short("m-0", (4,))], idle=())
    assert (d.direction, d.wanted) == ("hold", 5) and "maximum" in d.reason
    d = scaler.decide(0.0, replicas=0, short=[], idle=())
    assert (d.direction, d.wanted) == ("up", 1) and "minimum" in d.reason
    d = scaler.decide(0.0, replicas=2, short=[short("huge-0", (8,))], idle=())
    assert d.direction == "hold" and "huge-0 need more GPUs than a node" in d.reason


def test_gives_back_one_idle_node_after_the_delay_never_below_min_nor_while_short() -> None:
    scaler = NodeScaler(CFG)
    assert scaler.decide(0.0, replicas=3, short=[], idle=["a", "b"]).direction == "hold"
    d = scaler.decide(599.0, replicas=3, short=[], idle=["a", "b"])
    assert d.direction == "hold" and d.idle == ()
    d = scaler.decide(600.0, replicas=3, short=[short("m-0", (2,))], idle=["a", "b"])
    assert d.direction == "up"  # something short: never down, even with idle nodes
    d = scaler.decide(600.0, replicas=3, short=[], idle=["a", "b"])
    assert (d.direction, d.wanted, d.idle) == ("down", 2, ("a", "b"))
    assert "node a ran no engine for 600 s" in d.reason
    scaler.applied(d, 600.0)
    d = scaler.decide(700.0, replicas=2, short=[], idle=["b"])  # one at a time
    assert d.direction == "hold" and "cool-down" in d.reason
    d = scaler.decide(900.0, replicas=2, short=[], idle=["b"])
    assert (d.direction, d.wanted) == ("down", 1)
    scaler.applied(d, 900.0)
    scaler.decide(5000.0, replicas=1, short=[], idle=["c"])
    d = scaler.decide(5600.0, replicas=1, short=[], idle=["c"])
    assert (d.direction, d.wanted) == ("hold", 1) and "minimum" in d.reason


def test_a_node_that_gets_an_engine_starts_its_idle_time_afresh() -> None:
    scaler = NodeScaler(CFG)
    scaler.decide(0.0, replicas=3, short=[], idle=["a"])
    scaler.decide(500.0, replicas=3, short=[], idle=[])  # a runs an engine for a while
    assert scaler.decide(700.0, replicas=3, short=[], idle=["a"]).direction == "hold"
    assert scaler.decide(1300.0, replicas=3, short=[], idle=["a"]).direction == "down"


def test_a_scale_up_holds_scale_down_for_the_cooldown_too() -> None:
    scaler = NodeScaler(CFG)
    scaler.decide(0.0, replicas=2, short=[], idle=["a"])
    up = scaler.decide(1000.0, replicas=2, short=[short("m-0", (4,))], idle=["a"])
    scaler.applied(up, 1000.0)
    assert scaler.decide(1100.0, replicas=3, short=[], idle=["a"]).direction == "hold"
    assert scaler.decide(1300.0, replicas=3, short=[], idle=["a"]).direction == "down"


def test_idle_nodes_are_live_gpu_nodes_running_nothing_and_not_busy() -> None:
    fleet = Fleet()
    fleet.node("a", gpus=gpus(2))
    fleet.node("b", status("m-0", gpus=(0,)), gpus=gpus(2))
    fleet.node("c", gpus=gpus(2))
    fleet.node("cpu")
    fleet.node("gone", gpus=gpus(2), now=-100.0)
    fleet.registry.expire(0.0)
    assert idle_nodes(fleet.registry, busy=["c"]) == ["a"]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("cluster.x-k8s.io/v1beta1/machinedeployments/default", "node_scale_target"),
        ("a/b/c/d/e/f", "node_scale_target"),
        ("cluster.x-k8s.io/v1beta1//default/gpu", "node_scale_target"),
    ],
)
def test_a_bad_target_names_the_flag(text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        ScaleTarget.parse(text)


def test_target_parses_group_version_plural_namespace_name() -> None:
    parsed = ScaleTarget.parse("cluster.x-k8s.io/v1beta1/machinedeployments/default/gpu")
    assert parsed == TARGET


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"gpus_per_node": 0}, "node_scale_gpus_per_node"),
        ({"min_nodes": -1}, "node_scale_min"),
        ({"min_nodes": 3, "max_nodes": 2}, "node_scale_max"),
        ({"max_nodes": 0}, "node_scale_max"),
        ({"cooldown_s": -1}, "node_scale_cooldown_s"),
        ({"idle_s": -1}, "node_scale_idle_s"),
        ({"interval_s": 0}, "node_scale_interval_s"),
    ],
)
def test_bad_settings_name_the_key(changes: dict[str, float], key: str) -> None:
    settings = {"gpus_per_node": 4, "max_nodes": 3} | changes
    with pytest.raises(ConfigError, match=key):
        NodeScaleConfig(TARGET, **settings)  # type: ignore[arg-type]
