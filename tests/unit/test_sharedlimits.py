"""Fleet-wide limits without Redis (fleet.coordinator.sharedlimits): the token bucket, each
coordinator's share of rate and queue, and the health state that decides when Redis is asked.
Plain calls with explicit times; the admission test runs on trio's MockClock."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from fleet.coordinator.admission import PRIORITIES, Admission, Overloaded
from fleet.coordinator.apikeys import ApiKey
from fleet.coordinator.config import CoordinatorConfig
from fleet.coordinator.sharedlimits import (
    LocalLimits,
    QueueLedger,
    RedisHealth,
    TokenBucket,
    retry_after_s,
    share,
)
from fleet.protocol.errors import ConfigError


def test_the_bucket_allows_the_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0)
    assert [bucket.take(10.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(10.0) == pytest.approx(0.5)  # one token comes back every 0.5 s
    assert bucket.take(10.5) == 0.0
    assert bucket.take(10.5) > 0
    assert [bucket.take(100.0) for _ in range(4)][:3] == [0.0, 0.0, 0.0]  # refilled, capped at 3
    assert bucket.take(99.0) > 0  # a clock going back adds nothing


def test_each_of_n_coordinators_enforces_its_share_of_the_rate() -> None:
    key = ApiKey("k", b"", requests_per_s=10.0, burst=20.0)
    limits = LocalLimits(max_queue=500, coordinators=2)
    # 10/s with bursts of 20 for the fleet: 5/s with bursts of 10 here.
    assert [limits.take_now(key, 0.0) for _ in range(10)] == [0.0] * 10
    assert limits.take_now(key, 0.0) == pytest.approx(0.2)
    assert limits.take_now(key, 0.2) == 0.0
    assert limits.take_now(ApiKey("open", b""), 0.0) == 0.0  # no limit: never refused
    # a share never drops below one request of burst
    tight = ApiKey("t", b"", requests_per_s=1.0, burst=1.0)
    assert [LocalLimits(500, 4).take_now(tight, 0.0) for _ in range(1)] == [0.0]
    assert share(1.0, 4) == 1.0 and share(500, 3) == pytest.approx(166.67, abs=0.01)
    assert retry_after_s(0.2) == 1 and retry_after_s(2.1) == 3


def test_each_coordinator_holds_its_share_of_the_queue() -> None:
    limits = LocalLimits(max_queue=5, coordinators=2)  # 2 waiters here (5 // 2)
    assert [limits.reserve_now("m") for _ in range(3)] == [True, True, False]
    assert limits.reserve_now("other") is True  # per model
    limits.release("m")
    assert limits.reserve_now("m") is True
    assert limits.ledger.counts == {"m": 2, "other": 1}
    ledger = QueueLedger(1)
    with pytest.raises(RuntimeError, match="below 0"):
        ledger.remove("m")


def test_coordinators_expected_is_checked() -> None:
    with pytest.raises(ConfigError) as err:
        LocalLimits(500, 0)
    assert err.value.key == "coordinators_expected"
    with pytest.raises(ConfigError) as err:
        CoordinatorConfig(coordinators_expected=0)
    assert err.value.key == "coordinators_expected"


def test_after_a_failure_redis_is_asked_again_only_after_retry_s() -> None:
    health = RedisHealth(retry_s=1.0)
    assert health.usable(0.0)
    health.failed(10.0)
    assert not health.usable(10.5) and health.usable(11.0)
    health.ok()
    assert health.usable(10.5) and health.failures == 1


async def test_admission_sheds_past_the_coordinators_share(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # No engine: every request waits. The fleet's queue holds 4; this coordinator, one of two,
    # holds 2, and a more urgent request still takes a less urgent waiter's place.
    limits = LocalLimits(4, coordinators=2)
    admission = Admission(lambda m: 0, max_queue=4, limits=limits)
    log: list[str] = []

    async def ask(name: str, priority: int) -> None:
        try:
            async with admission.admit("m", priority, trio.current_time() + 10):
                log.append(f"in {name}")
        except Overloaded as exc:
            log.append(f"503 {name}: {exc.message.split(';')[0]}")

    async with trio.open_nursery() as nursery:
        for name, prio in (("a", "standard"), ("b", "standard"), ("c", "batch"), ("d", "high")):
            nursery.start_soon(ask, name, PRIORITIES[prio])
            await trio.sleep(1)
        assert admission.queued("m") == 2
    assert log[:2] == [
        "503 c: The queue for `m` is full (4 waiting)",
        "503 b: Shed from the full queue of `m` by higher-priority requests",
    ]
    late = "`m` had no free engine before the request's deadline"
    assert sorted(log[2:]) == [f"503 a: {late}", f"503 d: {late}"]
    assert limits.ledger.counts == {"m": 0}
