"""Canary traffic split (fleet.coordinator.traffic): new sessions by weight, sticky per session."""

from __future__ import annotations

from collections import Counter

from fleet.coordinator.deployspec import FleetModel, parse_model
from fleet.coordinator.traffic import pick_version, serving, session_point, traffic_shares


def model(name: str, weight: int, served: str = "chat") -> FleetModel:
    return parse_model(
        {
            "apiVersion": "fleet.dev/v1alpha1",
            "kind": "FleetModel",
            "metadata": {"name": name},
            "spec": {"servedModelNames": [served], "source": "/m", "trafficWeight": weight},
        }
    )


V1, V2 = model("chat-v1", 90), model("chat-v2", 10)
SESSIONS = [f"session-{i}" for i in range(20_000)]


def test_ninety_ten_split_over_many_sessions() -> None:
    counts = Counter(pick_version([V1, V2], s).name for s in SESSIONS)  # type: ignore[union-attr]
    share = counts["chat-v2"] / len(SESSIONS)
    assert abs(share - 0.10) < 0.01, counts  # 3 sigma of a binomial(20000, 0.1) is ~0.0064


def test_sticky_per_session_and_independent_of_order() -> None:
    for s in SESSIONS[:500]:
        first = pick_version([V1, V2], s)
        assert pick_version([V2, V1], s) is first
        assert pick_version([V1, V2], s) is first


def test_changing_weights_moves_only_the_sessions_between_the_edges() -> None:
    before = {s: pick_version([V1, V2], s).name for s in SESSIONS}  # type: ignore[union-attr]
    after = {
        s: pick_version([model("chat-v1", 80), model("chat-v2", 20)], s).name  # type: ignore[union-attr]
        for s in SESSIONS
    }
    moved = [s for s in SESSIONS if before[s] != after[s]]
    assert all(before[s] == "chat-v1" and after[s] == "chat-v2" for s in moved)
    assert abs(len(moved) / len(SESSIONS) - 0.10) < 0.01


def test_zero_weights_and_no_versions() -> None:
    assert pick_version([], "s") is None
    assert pick_version([model("a", 0), model("b", 0)], "s") is None
    only = model("b", 5)
    assert {pick_version([model("a", 0), only], s) for s in SESSIONS[:200]} == {only}


def test_versions_of_a_served_name_and_shares() -> None:
    other = model("embed", 100, served="embed")
    assert serving([V2, other, V1], "chat") == [V1, V2]
    assert traffic_shares([V1, V2]) == {"chat-v1": 0.9, "chat-v2": 0.1}
    assert traffic_shares([model("a", 0)]) == {"a": 0.0}
    assert 0.0 <= session_point("x") < 1.0
    assert session_point("x") == session_point("x")
