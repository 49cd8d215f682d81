"""The fleet's autoscalers (fleet.coordinator.scaling): which deployments scale, the leader's
decisions, a follower's counts, and the demand signal. Plain calls."""

from __future__ import annotations

from typing import Any

from fleet.coordinator.autoscale import AutoscaleConfig
from fleet.coordinator.deployment import Deployment
from fleet.coordinator.deployspec import parse_model
from fleet.coordinator.placement import Placer
from fleet.coordinator.scaling import Scaling, demand, running

CFG = AutoscaleConfig(target_per_engine=2, stable_window_s=10, panic_window_s=1,
                      scale_to_zero_after_s=5)  # fmt: skip


def model(name: str, served: str | None = None, **spec: Any) -> Any:
    doc = {"apiVersion": "fleet.dev/v1alpha1", "kind": "FleetModel", "metadata": {"name": name},
           "spec": {"servedModelNames": [served or name], "source": "/m", **spec}}  # fmt: skip
    return parse_model(doc)


def test_only_min_max_deployments_scale_and_changes_are_reported() -> None:
    scaling = Scaling(CFG)
    auto, fixed = model("auto", minReplicas=0, maxReplicas=3), model("fixed", replicas=2)
    asked: list[str] = []

    def demand_of(m: Any) -> float:
        asked.append(m.name)
        return 5.0

    changed = scaling.tick([auto, fixed], demand_of, now=0.0)
    assert asked == ["auto"]  # a fixed count is not the autoscaler's
    assert [(name, d.replicas, d.mode) for name, d in changed] == [("auto", 3, "from-zero")]
    assert scaling.counts == {"auto": 3}
    assert scaling.tick([auto, fixed], demand_of, now=0.5) == []  # unchanged: not reported
    assert scaling.tick([fixed], demand_of, now=1.0) == [] and scaling.counts == {}  # deleted


def test_a_follower_takes_the_count_the_nodes_run() -> None:
    scaling = Scaling(CFG)
    auto = model("auto", minReplicas=1, maxReplicas=4)
    assert scaling.follow([auto], lambda m: 3) == ["auto"] and scaling.counts == {"auto": 3}
    assert scaling.follow([auto], lambda m: 3) == []
    assert scaling.follow([auto], lambda m: 9) == ["auto"] and scaling.counts == {"auto": 4}
    assert scaling.follow([auto], lambda m: 0) == ["auto"] and scaling.counts == {"auto": 1}


def test_running_counts_up_to_the_highest_index_a_node_reports() -> None:
    auto = model("auto", minReplicas=0, maxReplicas=4)
    assert running(auto, set()) == 0
    assert running(auto, {"auto-0", "auto-2", "other-7"}) == 3
    assert running(auto, {"auto-9"}) == 0  # beyond maxReplicas: not this deployment's


def test_demand_is_in_flight_on_its_engines_plus_its_share_of_the_queue() -> None:
    v1 = model("chat-v1", "chat", minReplicas=0, maxReplicas=4)
    placer = Placer(
        (Deployment("chat", "/m", name="chat-v1", replicas=2),
         Deployment("chat", "/m", name="chat-v2", replicas=1)),
        assign_timeout_s=30,
    )  # fmt: skip
    inflight = {"chat-v1-0": 3, "chat-v1-1": 1, "chat-v2-0": 7}
    got = demand(v1, placer, lambda e: inflight.get(e, 0), lambda name: 6 if name == "chat" else 0)
    assert got == 3 + 1 + 6 / 2  # two deployments serve `chat`: half its queue each
