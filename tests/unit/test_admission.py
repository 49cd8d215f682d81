"""Admission control (fleet.coordinator.admission): slots, priority queues, shedding, deadlines.
Time runs on trio's MockClock (autojump): waiting for a deadline takes no real time."""

from __future__ import annotations

import pytest
import trio
import trio.lowlevel
import trio.testing

from fleet.coordinator.admission import (
    PRIORITIES,
    Admission,
    Overloaded,
    WaitEstimate,
    priority_of,
)
from fleet.coordinator.errors import InvalidRequest

CRITICAL, HIGH, STANDARD, BATCH = (PRIORITIES[p] for p in ("critical", "high", "standard", "batch"))


class Engines:
    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self, model: str) -> int:
        return self.n


async def _hold(admission: Admission, priority: int, release: trio.Event, log: list[str],
                name: str, deadline: float = float("inf")) -> None:  # fmt: skip
    try:
        async with admission.admit("m", priority, deadline) as queued:
            log.append(f"in {name}" + (" (queued)" * queued * (name == "queued?")))
            await release.wait()
    except Overloaded as exc:
        log.append(f"503 {name} retry-after {exc.retry_after_s}")


async def test_requests_past_the_slots_wait_and_are_admitted_by_priority(
    autojump_clock: trio.testing.MockClock,
) -> None:
    admission = Admission(Engines(1), slots_per_engine=1, max_queue=10)
    log: list[str] = []
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        first = trio.Event()
        nursery.start_soon(_hold, admission, STANDARD, first, log, "first")
        await trio.sleep(1)
        for name, prio in (("batch", BATCH), ("std", STANDARD), ("crit", CRITICAL)):
            nursery.start_soon(_hold, admission, prio, done, log, name)
            await trio.sleep(1)
        assert log == ["in first"] and admission.queued("m") == 3
        first.set()
        await trio.sleep(1)
        assert log[1] == "in crit"  # the most urgent goes first
        done.set()
    assert log == ["in first", "in crit", "in std", "in batch"]
    assert admission.inflight("m") == 0 and admission.queued("m") == 0


async def test_the_slot_says_whether_the_request_waited_for_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    admission = Admission(Engines(1), slots_per_engine=1, max_queue=10)
    log: list[str] = []
    async with trio.open_nursery() as nursery:
        release = trio.Event()
        nursery.start_soon(_hold, admission, STANDARD, release, log, "queued?")
        await trio.sleep(1)
        nursery.start_soon(_hold, admission, STANDARD, trio.Event(), log, "queued?")
        await trio.sleep(1)
        release.set()
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert log == ["in queued?", "in queued? (queued)"]


async def test_a_full_queue_sheds_the_lowest_priority_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    admission = Admission(Engines(1), slots_per_engine=1, max_queue=2)
    log: list[str] = []
    release = trio.Event()
    async with trio.open_nursery() as nursery:
        for name, prio in (("a", STANDARD), ("b", BATCH), ("c", STANDARD)):
            nursery.start_soon(_hold, admission, prio, release, log, name)
            await trio.sleep(1)
        assert log == ["in a"] and admission.queued("m") == 2
        nursery.start_soon(_hold, admission, HIGH, release, log, "d")  # queue full: b goes
        await trio.sleep(1)
        nursery.start_soon(_hold, admission, BATCH, release, log, "e")  # nothing lower: e goes
        await trio.sleep(1)
        assert log == ["in a", "503 b retry-after 2", "503 e retry-after 2"]
        release.set()
    assert log[3:] == ["in d", "in c"]
    assert admission.shed == 2


async def test_without_engines_requests_wait_until_one_is_ready_or_their_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engines = Engines(0)  # scaling from zero
    admission = Admission(engines, slots_per_engine=2)
    log: list[str] = []
    release = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            _hold, admission, STANDARD, release, log, "patient", trio.current_time() + 60
        )
        nursery.start_soon(
            _hold, admission, STANDARD, release, log, "hasty", trio.current_time() + 5
        )
        await trio.sleep(10)
        assert log == ["503 hasty retry-after 5"]  # answered at its deadline, not left hanging
        engines.n = 1
        admission.wake("m")  # an engine became ready
        await trio.sleep(1)
        assert log[-1] == "in patient"
        release.set()
    assert admission.inflight("m") == 0 and admission.queued("m") == 0


async def test_a_waiter_that_is_cancelled_leaves_the_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    admission = Admission(Engines(1), slots_per_engine=1)
    release = trio.Event()
    log: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_hold, admission, STANDARD, release, log, "holder")
        await trio.sleep(1)
        with trio.move_on_after(3):  # the client goes away while queued
            async with admission.admit("m", STANDARD):
                pytest.fail("admitted while the slot is held")
        assert admission.queued("m") == 0
        release.set()
    assert admission.inflight("m") == 0


def test_priority_header() -> None:
    assert priority_of({}) == STANDARD
    assert priority_of({"x-priority": "Critical"}) == CRITICAL
    assert priority_of({"x-priority": "batch"}) == BATCH
    with pytest.raises(InvalidRequest) as err:
        priority_of({"x-priority": "urgent!!"})
    assert err.value.param == "x-priority"


def test_an_api_keys_tier_is_the_default_and_the_most_urgent_a_request_may_ask() -> None:
    high = priority_of({}, tier=1)
    assert high == 1
    assert priority_of({"x-priority": "critical"}, tier=1) == 1  # never above the tier
    assert priority_of({"x-priority": "batch"}, tier=1) == BATCH  # lower is allowed


def test_the_wait_bound_starts_wide_and_narrows_while_waits_are_steady() -> None:
    wait = WaitEstimate()
    assert wait.bound_s() == 0.0 and wait.allows(0.0)  # nothing seen yet: nothing to shed for
    wait.record(1.0)
    assert wait.bound_s() == 3.0  # mean 1 + 4 deviations of 0.5 (RFC 6298's first sample)
    for _ in range(40):
        wait.record(1.0)
    assert wait.bound_s() == 1.5  # steady: the margin of 1.5 means is the floor
    assert wait.allows(1.5) and not wait.allows(1.49)


def test_the_wait_bound_widens_when_waits_wander() -> None:
    """A mean that lags growing waits would send requests that miss their deadline at the
    engine; the deviation term keeps the bound above the waits actually seen."""
    steady, jittery = WaitEstimate(), WaitEstimate()
    for i in range(40):
        steady.record(1.0)
        jittery.record(0.5 if i % 2 else 1.5)  # the same mean, waits off by 0.5 s
    assert jittery.mean_s is not None and abs(jittery.mean_s - 1.0) < 0.15
    assert jittery.bound_s() > 2.5 > steady.bound_s()
    growing = WaitEstimate()
    for took in (1.0, 2.0, 3.0, 4.0, 5.0):
        growing.record(took)
    assert growing.mean_s is not None and growing.mean_s < 3.5  # the mean lags...
    assert growing.bound_s() > 5.0  # ...the bound covers the latest wait


@pytest.mark.parametrize("key", ["slots_per_engine", "max_queue"])
def test_coordinator_admission_settings_are_checked(key: str) -> None:
    from fleet.coordinator.service import CoordinatorConfig
    from fleet.protocol.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        CoordinatorConfig(**{key: 0})  # type: ignore[arg-type]
    assert key in str(err.value)


async def test_requests_draining_off_routing_do_not_take_the_routable_engines_slots(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engines, draining = Engines(2), Engines(0)
    admission = Admission(engines, slots_per_engine=2, held_elsewhere=draining)
    log: list[str] = []
    on_a, on_b, late = trio.Event(), trio.Event(), trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_hold, admission, STANDARD, on_a, log, "a")
        nursery.start_soon(_hold, admission, STANDARD, on_b, log, "b")
        await trio.sleep(1)
        engines.n, draining.n = 1, 1  # scaled down: b's engine drains, b runs on there
        nursery.start_soon(_hold, admission, STANDARD, late, log, "c")
        await trio.sleep(1)
        # a and b start in either order (trio shuffles a batch of new tasks)
        assert sorted(log) == ["in a", "in b", "in c"]  # the routable engine had a free slot
        nursery.start_soon(_hold, admission, STANDARD, late, log, "d")
        await trio.sleep(1)
        assert admission.queued("m") == 1  # ... and now it has none
        draining.n = 0
        on_b.set()  # b finishes on the drained engine: that frees no routable slot
        await trio.sleep(1)
        assert sorted(log) == ["in a", "in b", "in c"] and admission.queued("m") == 1
        on_a.set()
        await trio.sleep(1)
        assert log[-1] == "in d"
        late.set()
    assert admission.inflight("m") == 0
