"""Versions of a served name (fleet.coordinator.versions): which engines a request may use."""

from __future__ import annotations

from collections import Counter

from fleet.coordinator.deployment import Deployment
from fleet.coordinator.placement import Placer
from fleet.coordinator.registry import EngineView
from fleet.coordinator.versions import engines_for, session_key


def engine(engine_id: str, model: str = "chat") -> EngineView:
    return EngineView(engine_id, "n1", model, "http://127.0.0.1:1", 1, "ready", "both", "sim",
                      0, 32, (), True)  # fmt: skip


def placer(v1_weight: int = 90, v2_weight: int = 10) -> Placer:
    return Placer(
        (
            Deployment("chat", "/m", replicas=2, name="chat-v1", traffic_weight=v1_weight),
            Deployment("chat", "/m", replicas=1, name="chat-v2", traffic_weight=v2_weight,
                       aliases=("chat-next",)),
            Deployment("code", "/m", replicas=1),
        ),
        assign_timeout_s=30,
    )  # fmt: skip


ALL = [engine("chat-v1-0"), engine("chat-v1-1"), engine("chat-v2-0"), engine("code-0", "code")]


def ids(engines: list[EngineView]) -> list[str]:
    return [e.id for e in engines]


def test_new_sessions_split_by_weight_and_stick() -> None:
    p = placer()
    picks = Counter(
        "v2" if ids(engines_for(p, ALL, "chat", f"s{i}")) == ["chat-v2-0"] else "v1"
        for i in range(4000)
    )
    assert 0.08 < picks["v2"] / 4000 < 0.12
    first = ids(engines_for(p, ALL, "chat", "s1"))
    assert all(ids(engines_for(p, ALL, "chat", "s1")) == first for _ in range(10))
    assert first in (["chat-v1-0", "chat-v1-1"], ["chat-v2-0"])


def test_a_name_routes_only_to_its_deployments() -> None:
    p = placer()
    assert ids(engines_for(p, ALL, "code", "s")) == ["code-0"]
    assert ids(engines_for(p, ALL, "chat-next", "s")) == ["chat-v2-0"]  # an alias of one version
    assert engines_for(p, ALL, "nobody", "s") == []
    # capacity counts every version
    assert ids(engines_for(p, ALL, "chat", None)) == ["chat-v1-0", "chat-v1-1", "chat-v2-0"]


def test_a_version_without_a_ready_engine_leaves_its_sessions_to_the_others() -> None:
    p = placer(v1_weight=0, v2_weight=100)
    assert ids(engines_for(p, ALL, "chat", "s")) == ["chat-v2-0"]
    without_v2 = [e for e in ALL if e.id != "chat-v2-0"]
    assert ids(engines_for(p, without_v2, "chat", "s")) == ["chat-v1-0", "chat-v1-1"]


def test_engines_no_deployment_owns_serve_the_name_they_report() -> None:
    p = Placer((), assign_timeout_s=30)
    assert ids(engines_for(p, ALL, "code", "s")) == ["code-0"]


def test_the_session_key_is_the_session_header_else_the_request() -> None:
    assert session_key({"x-session-id": "abc"}, "req-1") == "abc"
    assert session_key({"x-session-token": "tok"}, "req-1") == "tok"
    assert session_key({}, "req-1") == "req-1"
