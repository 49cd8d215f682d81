"""The least-loaded picker and the in-flight counter (fleet.coordinator.picker)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from fleet.coordinator.picker import InflightCounter, pick_least_loaded
from fleet.coordinator.registry import EngineView


def view(engine_id: str) -> EngineView:
    return EngineView(
        id=engine_id,
        node="a",
        model="m",
        url=f"http://127.0.0.1/{engine_id}",
        pid=1,
        state="ready",
        role="both",
        kind="vllm",
        restarts=0,
        block_size=16,
        gpus=(),
        routable=True,
    )


def pick(engines: Sequence[EngineView], inflight: InflightCounter, rng: random.Random) -> str:
    picked = pick_least_loaded(engines, inflight, rng)
    assert picked is not None
    return picked.id


def counter(**counts: int) -> InflightCounter:
    inflight = InflightCounter()
    for engine_id, n in counts.items():
        for _ in range(n):
            inflight.acquire(engine_id)
    return inflight


def test_least_loaded_engine_is_chosen() -> None:
    engines = [view("a"), view("b"), view("c")]
    inflight = counter(a=3, b=1, c=2)
    rng = random.Random(0)
    assert {pick(engines, inflight, rng) for _ in range(20)} == {"b"}


def test_an_engine_never_used_counts_as_idle() -> None:
    engines = [view("busy"), view("fresh")]
    assert pick(engines, counter(busy=1), random.Random(0)) == "fresh"


def test_no_candidates_gives_none() -> None:
    assert pick_least_loaded([], counter(a=1), random.Random(0)) is None


def test_ties_are_broken_at_random_over_every_tied_engine() -> None:
    engines = [view("a"), view("b"), view("c")]
    inflight = counter(a=1, b=1, c=2)
    rng = random.Random(1234)
    picks = [pick(engines, inflight, rng) for _ in range(200)]
    assert set(picks) == {"a", "b"}
    assert 50 < picks.count("a") < 150


def test_same_seed_gives_same_choices() -> None:
    engines = [view(str(i)) for i in range(5)]
    inflight = InflightCounter()

    def run(seed: int) -> list[str]:
        rng = random.Random(seed)
        return [pick(engines, inflight, rng) for _ in range(20)]

    assert run(7) == run(7)


def test_picking_with_acquire_spreads_requests_evenly() -> None:
    engines = [view("a"), view("b"), view("c")]
    inflight = InflightCounter()
    rng = random.Random(3)
    for _ in range(9):
        inflight.acquire(pick(engines, inflight, rng))
    assert [inflight.get(e) for e in "abc"] == [3, 3, 3]


def test_acquire_and_release_count_per_engine() -> None:
    inflight = InflightCounter()
    assert inflight.get("a") == 0
    inflight.acquire("a")
    inflight.acquire("a")
    inflight.acquire("b")
    assert (inflight.get("a"), inflight.get("b")) == (2, 1)
    inflight.release("a")
    assert (inflight.get("a"), inflight.get("b")) == (1, 1)
    inflight.release("a")
    inflight.release("b")
    assert (inflight.get("a"), inflight.get("b")) == (0, 0)


@pytest.mark.parametrize("extra_releases", [1, 3])
def test_release_never_goes_negative(extra_releases: int) -> None:
    inflight = counter(a=1)
    for _ in range(1 + extra_releases):
        inflight.release("a")
    inflight.release("never-acquired")
    assert inflight.get("a") == 0
    assert inflight.get("never-acquired") == 0
    inflight.acquire("a")
    assert inflight.get("a") == 1  # an extra release is not banked against later requests
