"""Stream waits timed by one watchdog (coordinator/streamwatch.py, EngineCalls.next_chunk)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import httpx
import trio
import trio.testing

from fleet.coordinator import sockio
from fleet.coordinator.enginecalls import EngineCalls
from fleet.coordinator.enginehealth import EngineHealth
from fleet.coordinator.metrics import CoordinatorMetrics
from fleet.coordinator.picker import InflightCounter
from fleet.coordinator.pools import EnginePools
from fleet.coordinator.resilience import ResilienceConfig
from fleet.coordinator.streamwatch import TICKS, StreamWatch, StreamWatches


def _watch(engine_id: str, idle_s: float, aborts: list[str]) -> StreamWatch:
    return StreamWatch(engine_id, idle_s, lambda: aborts.append(engine_id))


def test_only_a_wait_on_the_engine_past_idle_s_is_overdue() -> None:
    watches, aborts = StreamWatches(), []
    waiting, writing, fresh = (_watch(e, 2.0, aborts) for e in ("a", "a", "b"))
    for w in (waiting, writing, fresh):
        watches.add(w)
    waiting.since = 10.0
    fresh.since = 11.5
    # ``writing`` has no wait under way (held up by its client): never overdue
    assert watches.overdue(11.9) == []
    assert watches.overdue(12.0) == [waiting]
    assert set(watches.overdue(13.5)) == {waiting, fresh}
    assert set(watches.waiting("a")) == {waiting}
    assert watches.tick_s == 2.0 / TICKS


def test_an_ended_stream_is_aborted_once_and_not_overdue_again() -> None:
    watches, aborts = StreamWatches(), []
    watch = _watch("a", 1.0, aborts)
    watches.add(watch)
    watch.since = 0.0
    watch.end("no byte for 1 s")
    watch.end("its engine was found down (a failed probe, or a stall)")
    assert aborts == ["a"] and watch.why == "no byte for 1 s"
    assert watches.overdue(5.0) == []


def test_forget_drops_only_empty_sets_of_engines_that_left() -> None:
    watches, aborts = StreamWatches(), []
    gone, busy = _watch("gone", 1.0, aborts), _watch("busy", 1.0, aborts)
    watches.add(gone)
    watches.add(busy)
    watches.remove(gone)
    watches.forget(keep=set())
    assert set(watches.by_engine) == {"busy"}  # a stream still runs there


def _calls() -> EngineCalls:
    inflight, streaming = InflightCounter(), InflightCounter()
    health = EngineHealth(ResilienceConfig(), inflight.get, streaming.get)
    pools = EnginePools(timeout=httpx.Timeout(5.0), max_connections=4, max_keepalive=2)
    return EngineCalls(pools, CoordinatorMetrics(), health, inflight, streaming)


async def _chunks(sock: trio.socket.SocketType) -> AsyncIterator[bytes]:
    """A body read from ``sock`` until its end."""
    while data := await sockio.receive(sock, wait_first=True):
        yield data


async def test_the_watchdog_ends_a_silent_wait_on_a_real_socket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = _calls()
    ours, engine = trio.socket.socketpair()
    with ours, engine, trio.fail_after(5):  # no watchdog: this wait would never end
        body = _chunks(ours)
        watch = calls.watch_stream("e1", 0.5, lambda: ours.shutdown(socket.SHUT_RDWR))
        await engine.send(b"data: 1\n\n")
        assert await calls.next_chunk(watch, body) == b"data: 1\n\n"
        started = trio.current_time()
        why = await calls.next_chunk(watch, body)  # the engine says nothing more
        waited = trio.current_time() - started
        calls.unwatch(watch)
    assert why == "no byte for 0.5 s"
    assert 0.5 <= waited <= 0.5 * (1 + 1 / TICKS) + 1e-9
    assert calls.streams.overdue(trio.current_time() + 60) == []


async def test_an_engine_put_down_ends_its_streams_waits_at_once() -> None:
    calls = _calls()
    ours, engine = trio.socket.socketpair()
    whys: list[bytes | str] = []
    with ours, engine, trio.fail_after(5):
        body = _chunks(ours)
        watch = calls.watch_stream("e1", 60.0, lambda: ours.shutdown(socket.SHUT_RDWR))

        async def wait() -> None:
            whys.append(await calls.next_chunk(watch, body))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            calls.health.down("e1", trio.current_time(), "a failed probe")
    assert whys == ["its engine was found down (a failed probe, or a stall)"]
