"""Fleet-wide limits in a real Redis (fleet.coordinator.redislimits): the Lua token bucket, the
queue counts with each coordinator's lease, and the fallback to the local share while Redis is
down. The scripts take Redis's time as an argument here (``now_ms``), so leases expire and
buckets refill exactly, without waiting."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import trio

from fleet.coordinator.admission import PRIORITIES, Admission, Overloaded
from fleet.coordinator.apikeys import ApiKey
from fleet.coordinator.config import CoordinatorConfig
from fleet.coordinator.metrics import CoordinatorMetrics
from fleet.coordinator.redislimits import RedisLimits, connect, limits_for
from fleet.coordinator.sharedlimits import LocalLimits
from fleet.protocol.errors import ConfigError

from ..redisserver import RedisServer

T0 = 1_000_000_000.0  # ms: a fixed Redis time


@pytest.fixture
def url(redis_server: RedisServer) -> Iterator[str]:
    """The session's Redis, emptied for this test."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield redis_server.url
    client.close()


def _limits(url: str, coordinator: str, *, max_queue: int = 3, **kw: float) -> RedisLimits:
    # A Redis that answers slowly (this machine under load) must not pass for one that is down:
    # only a stopped server (refused at once) tests the fallback here.
    kw.setdefault("timeout_s", 5.0)
    limits = RedisLimits(url, max_queue=max_queue, coordinators=2, coordinator_id=coordinator,
                         metrics=CoordinatorMetrics(), lease_s=5.0, **kw)  # fmt: skip
    limits.now_ms = repr(T0)
    return limits


def _metric(limits: RedisLimits, text: str) -> bool:
    return text in limits.metrics.render().decode()


async def test_the_bucket_allows_the_burst_then_the_rate_on_redis_time(url: str) -> None:
    a, b = _limits(url, "a"), _limits(url, "b")  # two coordinators, one bucket
    key = ApiKey("search", b"", requests_per_s=2.0, burst=3.0)
    assert [await c.take(key, 0.0) for c in (a, b, a)] == [0.0, 0.0, 0.0]
    assert await b.take(key, 0.0) == 0.5  # one token every 0.5 s: Retry-After 1 s
    a.now_ms = repr(T0 + 250)
    assert await a.take(key, 0.0) == 0.25  # half a token back; nothing spent by a refusal
    b.now_ms = repr(T0 + 500)
    assert await b.take(key, 0.0) == 0.0
    a.now_ms = repr(T0 + 60_000)  # refilled, capped at the burst
    assert [await a.take(key, 0.0) for _ in range(4)] == [0.0, 0.0, 0.0, 0.5]
    client = redis.Redis.from_url(url)
    assert 0 < client.pttl("fleet:rate:search") <= 2500  # gone once it would be full again
    assert await a.take(ApiKey("open", b""), 0.0) == 0.0 and not client.exists("fleet:rate:open")
    assert not _metric(a, "fleet_shared_limits_fallback_total{")


async def test_the_queue_bound_is_the_fleets_and_a_dead_coordinators_waiters_expire(
    url: str,
) -> None:
    a, b = _limits(url, "a"), _limits(url, "b")  # max_queue 3 for the fleet
    assert [await a.reserve("m") for _ in range(2)] == [True, True]
    assert await b.reserve("m") is True
    assert await b.reserve("m") is False  # 2 + 1 waiting: full, though b holds only 1
    assert await b.reserve("other") is True  # per model
    assert b.local.ledger.counts == {"m": 1, "other": 1}
    # a is SIGKILLed: nothing more from it. Its 2 waiters count until its lease ends (5 s).
    b.now_ms = repr(T0 + 4_999)
    assert await b.reserve("m") is False
    b.now_ms = repr(T0 + 5_001)
    assert [await b.reserve("m") for _ in range(3)] == [True, True, False]
    # a comes back under the same id: its first write replaces the dead process's counts
    a2 = _limits(url, "a")
    a2.now_ms = b.now_ms
    assert await a2.reserve("m") is False  # b holds 3
    b.release("m")
    assert await b.publish()
    assert await a2.reserve("m") is True
    assert redis.Redis.from_url(url).hget("fleet:queue:coord:a", "m") == b"1"


async def test_a_clean_stop_withdraws_the_counts_at_once(url: str) -> None:
    a, b = _limits(url, "a", heartbeat_s=0.05), _limits(url, "b")
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        assert [await a.reserve("m") for _ in range(3)] == [True, True, True]
        assert await b.reserve("m") is False
        nursery.cancel_scope.cancel()  # a stops (its 3 waiters are gone with it)
    client = redis.Redis.from_url(url)
    assert not client.exists("fleet:queue:coord:a")
    assert await b.reserve("m") is True  # at once, not after a's lease
    assert client.zrange("fleet:queue:coordinators", 0, -1) == [b"b"]


async def test_a_request_cancelled_while_redis_is_asked_holds_no_place(url: str) -> None:
    a = _limits(url, "a")
    with trio.CancelScope() as scope:
        scope.cancel()
        await a.reserve("m")
    assert scope.cancelled_caught and a.local.ledger.counts.get("m", 0) == 0
    # cancelled once it waits: it leaves the queue and its place is given back
    admission = Admission(lambda m: 0, max_queue=3, limits=a)
    with trio.move_on_after(0.5):
        async with admission.admit("m", PRIORITIES["standard"]):
            raise AssertionError("no engine: it cannot be admitted")
    assert a.local.ledger.counts.get("m", 0) == 0 and admission.queued("m") == 0


async def test_admission_bounds_the_fleets_queue_across_coordinators(url: str) -> None:
    # Two coordinators, no engine: every request waits. max_queue 3 for the fleet.
    changed = [trio.Event()]

    def on_change(model: str, queued: int) -> None:
        changed[0].set()
        changed[0] = trio.Event()

    a, b = _limits(url, "a"), _limits(url, "b")
    admit_a = Admission(lambda m: 0, max_queue=3, limits=a, on_change=on_change)
    admit_b = Admission(lambda m: 0, max_queue=3, limits=b, on_change=on_change)
    log: list[str] = []

    async def ask(admission: Admission, name: str, priority: str) -> None:
        try:
            async with admission.admit("m", PRIORITIES[priority]):
                log.append(f"in {name}")
        except Overloaded as exc:
            log.append(f"503 {name}: {exc.message[:24]}")

    async with trio.open_nursery() as nursery:
        for admission, name, prio in ((admit_a, "a1", "standard"), (admit_a, "a2", "standard"),
                                      (admit_b, "b1", "batch")):  # fmt: skip
            nursery.start_soon(ask, admission, name, prio)
            with trio.fail_after(10):  # it asks Redis (a thread), then waits in the queue
                await changed[0].wait()
        nursery.start_soon(ask, admit_b, "b2", "standard")  # full: takes b1's place
        with trio.fail_after(10):
            await changed[0].wait()
        await ask(admit_a, "a3", "batch")  # full, and a holds nothing less urgent: shed
        assert log == ["503 b1: Shed from the full queue", "503 a3: The queue for `m` is ful"]
        assert (admit_a.queued("m"), admit_b.queued("m")) == (2, 1)
        nursery.cancel_scope.cancel()  # the clients leave
    assert a.local.ledger.counts == {"m": 0} and b.local.ledger.counts == {"m": 0}


async def test_with_redis_down_requests_get_the_local_share_and_it_is_counted(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path).start()
    try:
        limits = _limits(server.url, "a", retry_s=60.0)
        key = ApiKey("k", b"", requests_per_s=1.0, burst=4.0)
        assert await limits.take(key, 0.0) == 0.0 and _metric(limits, "redis_up 1.0")
        server.stop()
        # The local share: 2 of the burst of 4 (one of 2 coordinators), 1 of max_queue 3.
        assert [await limits.take(key, 0.0) for _ in range(3)] == [0.0, 0.0, 2.0]
        assert [await limits.reserve("m") for _ in range(2)] == [True, False]
        assert _metric(limits, 'fleet_shared_limits_fallback_total{limit="rate"} 3.0')
        assert _metric(limits, 'fleet_shared_limits_fallback_total{limit="queue"} 2.0')
        assert _metric(limits, "fleet_shared_limits_redis_up 0.0")
        assert limits.health.failures == 1  # asked once; then not again for retry_s
        server.start()  # same port
        assert await limits.publish()  # the heartbeat finds it back
        assert await limits.take(key, 100.0) == 0.0 and _metric(limits, "redis_up 1.0")
        assert redis.Redis.from_url(server.url).hget("fleet:queue:coord:a", "m") == b"1"
    finally:
        server.stop()


def test_a_bad_redis_url_is_refused_naming_the_field() -> None:
    with pytest.raises(ConfigError) as err:
        connect("http://127.0.0.1:6379", 1.0)
    assert err.value.key == "redis_url"
    assert isinstance(limits_for(CoordinatorConfig(coordinators_expected=3), CoordinatorMetrics()),
                      LocalLimits)  # fmt: skip
