"""The attempt planner (fleet.coordinator.attempts): retries, backoff, deadlines, the retry
budget and resumes, as plain calls with explicit ``now`` values (no I/O, no clock)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import pytest

from fleet.coordinator.attempts import (
    CONNECTED,
    PAST_DEADLINE,
    AttemptPlan,
    AttemptPolicy,
    Broken,
    Failed,
    GiveUp,
    Refused,
    Try,
    Wait,
)
from fleet.coordinator.enginehealth import EngineHealth
from fleet.coordinator.errors import DeadlineExceeded, NoCapacity
from fleet.coordinator.registry import EngineView
from fleet.coordinator.resilience import ResilienceConfig, RetryBudget
from fleet.coordinator.router.prompt import RoutingRequest
from fleet.coordinator.router.scheduler import Decision

FIVE_XX = Failed("5xx", "engine answered 503", status=503)
RESET = Failed("connect", "connection reset")


def view(engine_id: str, node: str = "n1") -> EngineView:
    return EngineView(
        id=engine_id, node=node, model="m", url=f"http://{engine_id}", pid=1, state="ready",
        role="both", kind="sim", restarts=0, block_size=16, gpus=(), routable=True,
    )  # fmt: skip


class Fleet:
    """A policy over ``engines``; the scheduler picks the first candidate (in list order) and
    remembers what it was offered."""

    def __init__(self, engines: Sequence[EngineView], **cfg: float) -> None:
        self.engines = list(engines)
        self.cfg = ResilienceConfig(**cfg)  # type: ignore[arg-type]
        self.inflight: dict[str, int] = {}
        self.health = EngineHealth(self.cfg, lambda e: self.inflight.get(e, 0), lambda e: 0)
        self.budget = RetryBudget(self.cfg)
        self.offered: list[list[str]] = []
        self.policy = AttemptPolicy(
            self.cfg, self.health, self.budget, random.Random(0), self.pick, self.engines_for
        )

    def pick(
        self, routing: RoutingRequest, candidates: Sequence[EngineView], now: float
    ) -> Decision:
        self.offered.append([c.id for c in candidates])
        return Decision(candidates[0] if candidates else None)

    def engines_for(self, model: str, session: str | None) -> list[EngineView]:
        return self.engines

    def plan(self, now: float = 0.0, timeout_s: float | None = None) -> AttemptPlan:
        deadline = now + timeout_s if timeout_s is not None else math.inf
        return self.policy.plan(
            "m", RoutingRequest("m"), self.engines, now=now, deadline=deadline,
            timeout_s=timeout_s,
        )  # fmt: skip


def tried(step: object) -> str:
    assert isinstance(step, Try), step
    return step.engine.id


def gave_up(step: object) -> GiveUp:
    assert isinstance(step, GiveUp), step
    return step


# -- first tries ---------------------------------------------------------------------------------


def test_a_connected_first_try_ends_the_plan_and_closes_nothing() -> None:
    fleet = Fleet([view("a"), view("b")])
    plan = fleet.plan()
    step = plan.next(0.0)
    assert tried(step) == "a" and isinstance(step, Try) and step.retry == ""
    plan.record(CONNECTED, 0.1)
    assert fleet.health.breaker("a").consecutive == 0
    with pytest.raises(RuntimeError):
        plan.next(0.2)  # connected: nothing more to plan unless its stream breaks


def test_a_5xx_is_retried_on_another_engine_after_a_jittered_backoff() -> None:
    fleet = Fleet([view("a"), view("b"), view("c")], base_backoff_s=1.0, budget_ratio=1.0)
    plan = fleet.plan()
    assert tried(plan.next(0.0)) == "a"
    plan.record(FIVE_XX, 0.0)
    wait = plan.next(0.0)
    assert isinstance(wait, Wait) and 0 < wait.seconds <= 1.0  # retry 1: up to the base
    step = plan.next(wait.seconds)
    assert tried(step) == "b" and isinstance(step, Try) and step.retry == "5xx"
    assert fleet.offered[1] == ["b", "c"]  # never the engine that failed
    assert fleet.health.breaker("a").consecutive == 1


def _backoffs(seed: int) -> list[float]:
    """The waits before a request's first and second retries."""
    fleet = Fleet([view("a"), view("b"), view("c")], base_backoff_s=1.0, budget_ratio=1.0)
    fleet.policy.rng = random.Random(seed)
    plan = fleet.plan()
    waits = []
    for _ in range(2):
        plan.next(0.0)
        plan.record(RESET, 0.0)
        step = plan.next(0.0)
        assert isinstance(step, Wait)
        waits.append(step.seconds)
    return waits


def test_the_backoff_range_doubles_with_each_retry() -> None:
    draws = [_backoffs(seed) for seed in range(50)]
    assert all(0 <= first <= 1.0 and 0 <= second <= 2.0 for first, second in draws)
    assert max(second for _, second in draws) > 1.0


def test_the_last_engines_5xx_goes_to_the_client_when_tries_run_out() -> None:
    fleet = Fleet([view("a"), view("b"), view("c")], max_attempts=2, base_backoff_s=0)
    plan = fleet.plan()
    assert tried(plan.next(0.0)) == "a"
    plan.record(FIVE_XX, 0.0)
    assert tried(plan.next(0.0)) == "b"  # no backoff: no Wait
    plan.record(FIVE_XX, 0.1)
    end = gave_up(plan.next(0.1))
    assert end.error is None and end.why == "attempts"  # its own answer, passed on
    assert plan.next(0.5) is end  # final


def test_errors_with_no_engine_left_give_503_naming_the_last_error() -> None:
    fleet = Fleet([view("a"), view("b")], base_backoff_s=0)
    plan = fleet.plan()
    for t, engine in ((0.0, "a"), (0.1, "b")):
        assert tried(plan.next(t)) == engine
        plan.record(Failed("timeout", f"engine {engine}: read timed out"), t)
    end = gave_up(plan.next(0.2))
    assert isinstance(end.error, NoCapacity) and end.error.status == 503
    assert "engine b: read timed out" in end.error.message and end.why == "no_engine"


def test_a_refused_connection_puts_the_engine_down_and_retries_at_once_for_free() -> None:
    fleet = Fleet([view(f"dead{i}") for i in range(3)] + [view("good")], max_attempts=1,
                  budget_ratio=0.0, budget_min_per_s=0.0)  # fmt: skip
    downs: list[str] = []
    fleet.health.on_down = lambda engine_id, why: downs.append(engine_id)
    plan = fleet.plan()
    for i in range(3):
        step = plan.next(0.0)
        assert tried(step) == f"dead{i}"
        assert isinstance(step, Try) and step.retry == ("refused" if i else "")
        plan.record(Refused("connection refused"), 0.0)
        assert fleet.health.breaker(f"dead{i}").dead
    # One try in all and no budget, yet the fourth engine gets the request: refusals are free.
    assert tried(plan.next(0.0)) == "good"
    assert downs == ["dead0", "dead1", "dead2"]


def test_a_retry_goes_to_another_node_when_one_is_left() -> None:
    engines = [view("sick1", "sick"), view("sick2", "sick"), view("good", "well")]
    fleet = Fleet(engines, base_backoff_s=0, budget_ratio=1.0)
    plan = fleet.plan()
    assert tried(plan.next(0.0)) == "sick1"
    plan.record(FIVE_XX, 0.0)
    assert tried(plan.next(0.0)) == "good"
    assert fleet.offered[1] == ["good"]  # sick2 shares the failed node


def test_retries_stop_when_the_budget_is_spent() -> None:
    # budget: 0 × requests + 0.1/s × 10 s = 1 retry in the window, for every request together
    fleet = Fleet([view("a"), view("b")], base_backoff_s=0, budget_ratio=0.0,
                  budget_min_per_s=0.1)  # fmt: skip
    first = fleet.plan()
    first.next(0.0)
    first.record(RESET, 0.0)
    assert tried(first.next(0.0)) == "b"  # the one retry
    second = fleet.plan(now=1.0)
    second.next(1.0)
    second.record(FIVE_XX, 1.0)
    end = gave_up(second.next(1.0))
    assert end.why == "budget" and end.error is None  # the 5xx goes out as it is
    later = fleet.plan(now=20.0)  # the window moved on
    later.next(20.0)
    later.record(RESET, 20.0)
    assert tried(later.next(20.0)) == "b"


def test_the_deadline_gives_504_not_a_breaker_failure() -> None:
    fleet = Fleet([view("a"), view("b")])
    plan = fleet.plan(now=0.0, timeout_s=0.5)
    assert plan.deadline == 0.5
    assert tried(plan.next(0.0)) == "a"
    plan.record(PAST_DEADLINE, 0.5)
    end = gave_up(plan.next(0.5))
    assert isinstance(end.error, DeadlineExceeded) and end.error.status == 504
    assert "0.5 s" in end.error.message and end.why == "deadline"
    assert fleet.health.breaker("a").consecutive == 0  # a slow engine is not a failed one


def test_a_backoff_that_would_end_past_the_deadline_gives_504_at_once() -> None:
    fleet = Fleet([view("a"), view("b")], base_backoff_s=10.0, budget_ratio=1.0)
    plan = fleet.plan(now=0.0, timeout_s=1.0)
    plan.next(0.0)
    plan.record(RESET, 0.9)  # any backoff from [0, 10) lands past 1.0 here...
    end = gave_up(plan.next(0.9))
    assert isinstance(end.error, DeadlineExceeded) and end.why == "deadline"
    # ...and a deadline passed while nothing was outstanding ends the plan too.
    other = fleet.plan(now=0.0, timeout_s=1.0)
    assert isinstance(gave_up(other.next(1.0)).error, DeadlineExceeded)


def test_without_routable_or_filtered_engines_the_plan_gives_503() -> None:
    fleet = Fleet([view("a")])
    fleet.health.down("a", 0.0, "refused", refused=True)
    end = gave_up(fleet.plan(now=1.0).next(1.0))
    assert isinstance(end.error, NoCapacity) and "refused connections" in end.error.message
    nothing = Fleet([view("b")])
    nothing.pick = lambda routing, candidates, now: Decision(None)  # type: ignore[method-assign]
    nothing.policy.pick = nothing.pick
    end = gave_up(nothing.plan().next(0.0))
    assert end.why == "filtered" and isinstance(end.error, NoCapacity)
    assert end.error.retry_after_s == 5


def test_outcomes_out_of_turn_are_refused() -> None:
    plan = Fleet([view("a")]).plan()
    with pytest.raises(RuntimeError):
        plan.record(CONNECTED, 0.0)  # nothing tried yet
    plan.next(0.0)
    with pytest.raises(RuntimeError):
        plan.record(Broken("cut"), 0.0)  # not connected
    with pytest.raises(ValueError):
        Fleet([view("a")]).policy.plan(
            "m", RoutingRequest("m"), [view("a")], now=0.0, deadline=5.0, timeout_s=None
        )


# -- resumes ---------------------------------------------------------------------------------


def connected(fleet: Fleet, timeout_s: float | None = None) -> AttemptPlan:
    plan = fleet.plan(timeout_s=timeout_s)
    plan.next(0.0)
    plan.record(CONNECTED, 0.0)
    return plan


def test_a_broken_stream_is_continued_on_another_engine() -> None:
    fleet = Fleet([view("a"), view("b"), view("c")])
    plan = connected(fleet)
    plan.record(Broken("no byte for 30 s"), 1.0)
    assert fleet.health.breaker("a").consecutive == 1  # the silent engine counts a failure
    assert tried(plan.next(1.0)) == "b"
    plan.record(FIVE_XX, 1.1)  # the first continuation fails: another one, at once
    assert tried(plan.next(1.1)) == "c"
    plan.record(CONNECTED, 1.2)
    assert plan.resumes == 1
    plan.record(Broken("cut"), 2.0)  # no engine of this stream is left
    end = gave_up(plan.next(2.0))
    assert end.why == "no_engine" and end.error is not None


def test_a_resume_considers_engines_that_failed_first_tries() -> None:
    fleet = Fleet([view("a"), view("b")], base_backoff_s=0)
    plan = fleet.plan()
    plan.next(0.0)
    plan.record(FIVE_XX, 0.0)  # a failed this request's first try
    assert tried(plan.next(0.0)) == "b"
    plan.record(CONNECTED, 0.1)
    plan.record(Broken("cut"), 1.0)
    assert tried(plan.next(1.0)) == "a"  # only this stream's engines are avoided


def test_resumes_are_bounded_by_max_resumes_and_the_deadline() -> None:
    fleet = Fleet([view(e) for e in "abcd"], max_resumes=1)
    plan = connected(fleet)
    plan.record(Broken("cut"), 1.0)
    plan.next(1.0)
    plan.record(CONNECTED, 1.1)
    plan.record(Broken("cut"), 2.0)
    assert gave_up(plan.next(2.0)).why == "exhausted"
    late = connected(Fleet([view("a"), view("b")]), timeout_s=5.0)
    late.record(Broken("cut"), 5.0)
    assert gave_up(late.next(5.0)).why == "no_engine"  # the deadline passed


def test_a_continuation_the_engine_refuses_ends_the_stream() -> None:
    fleet = Fleet([view("a"), view("b"), view("c")])
    plan = connected(fleet)
    plan.record(Broken("cut"), 1.0)
    assert tried(plan.next(1.0)) == "b"
    plan.record(Failed("refused", status=400, retryable=False), 1.1)
    end = gave_up(plan.next(1.1))
    assert end.why == "refused" and end.error is not None and "(400)" in end.error.message
    assert fleet.health.breaker("b").consecutive == 0  # its answer was an answer


def test_a_refused_continuation_puts_the_engine_down_and_moves_on() -> None:
    fleet = Fleet([view("a"), view("b"), view("c")])
    plan = connected(fleet)
    plan.record(Broken("cut"), 1.0)
    assert tried(plan.next(1.0)) == "b"
    plan.record(Refused("connection refused"), 1.0)
    assert fleet.health.breaker("b").state == "open" and fleet.health.breaker("b").dead
    assert tried(plan.next(1.0)) == "c"
