"""The simulator's scheduler and engine loop: batching, queueing, preemption, step times.

Engine tests run on trio's ``MockClock`` (``autojump_clock``) and assert virtual times exactly;
the latencies are powers of two in seconds (1/16 s per prompt token, 1/2 s per decode step,
slope 1/2), so every sum is exact in binary floating point.
"""

from __future__ import annotations

import itertools

import pytest
import trio

from fleet.agent.sim.cache import PrefixCache
from fleet.agent.sim.engine import SimEngine
from fleet.agent.sim.faults import FaultState
from fleet.agent.sim.latency import LatencyModel
from fleet.agent.sim.scheduler import Scheduler, SimRequest
from fleet.protocol.errors import ConfigError

LATENCY = LatencyModel(prefill_ms_per_token=62.5, decode_ms_per_token=500, decode_batch_slope=0.5)


def _scheduler(
    *, num_blocks: int = 256, block_size: int = 4, max_num_seqs: int = 8, budget: int = 1024
) -> Scheduler:
    cache = PrefixCache(block_size=block_size, num_blocks=num_blocks, hash_seed="t")
    return Scheduler(cache, LATENCY, max_num_seqs=max_num_seqs, max_batched_tokens=budget)


def _request(rid: str, prompt: tuple[int, ...], max_tokens: int = 4) -> SimRequest:
    counter = itertools.count(1000)
    return SimRequest(rid, prompt, max_tokens, 0.0, lambda: next(counter))


def _engine(**kw: int) -> SimEngine:
    return SimEngine(_scheduler(**kw), vocabulary=range(3, 100), seed=1)


# -- latency model ----------------------------------------------------------------------------


def test_step_time_is_prefill_tokens_plus_a_shared_decode_step() -> None:
    assert LATENCY.step_s(prefill_tokens=16, decode_seqs=0) == 1.0
    assert LATENCY.step_s(prefill_tokens=0, decode_seqs=1) == 0.5
    assert LATENCY.step_s(prefill_tokens=0, decode_seqs=3) == 1.0
    assert LATENCY.step_s(prefill_tokens=8, decode_seqs=1, slow_factor=2) == 2.0
    defaults = LatencyModel()
    assert defaults.step_s(prefill_tokens=1000, decode_seqs=0) == pytest.approx(0.05)
    assert defaults.step_s(prefill_tokens=0, decode_seqs=64) == pytest.approx(0.01808)


@pytest.mark.parametrize("field", ["prefill_ms_per_token", "decode_ms_per_token"])
def test_latency_rejects_negative_or_nan(field: str) -> None:
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError):
            LatencyModel(**{field: bad})


# -- the scheduler, sans I/O ------------------------------------------------------------------


def test_waiting_requests_are_admitted_fifo_up_to_max_num_seqs() -> None:
    s = _scheduler(max_num_seqs=2)
    for rid in "abc":
        s.add(_request(rid, (1, 2, 3)))
    plan = s.schedule(0.0)
    assert [r.request_id for r in plan.admitted] == ["a", "b"]
    assert [r.request_id for r in s.waiting] == ["c"]
    assert plan.prefill_tokens == 6 and plan.duration_s == 6 / 16


def test_a_long_prompt_is_prefilled_in_chunks_and_answers_after_the_last() -> None:
    s = _scheduler(budget=8)
    s.add(_request("a", tuple(range(20)), max_tokens=1))
    sizes = []
    now = 0.0
    while s.has_work:
        plan = s.schedule(now)
        sizes.append(plan.entries[0][1])
        now += plan.duration_s
        result = s.finish_step(plan, now)
    assert sizes == [8, 8, 4]
    assert result.outputs[0].finish_reason == "length" and now == 20 / 16


def test_the_head_of_the_queue_blocks_later_requests_that_would_fit() -> None:
    s = _scheduler(num_blocks=5, block_size=2)  # 4 usable blocks
    s.add(_request("big", tuple(range(5))))  # 3 blocks
    s.schedule(0.0)
    s.add(_request("huge", tuple(range(10, 17))))  # 4 blocks: does not fit now
    s.add(_request("tiny", (50,)))  # 1 block: would fit, but waits its turn
    plan = s.schedule(1.0)
    assert [r.request_id for r in plan.admitted] == []
    assert [r.request_id for r in s.waiting] == ["huge", "tiny"]


def test_prefix_hits_are_recorded_at_admission_and_skip_compute() -> None:
    s = _scheduler()
    prompt = tuple(range(16))
    s.add(_request("a", prompt, max_tokens=1))
    plan = s.schedule(0.0)
    s.finish_step(plan, 1.0)
    s.add(_request("b", prompt, max_tokens=1))
    plan = s.schedule(1.0)
    (b,) = plan.admitted
    assert b.num_cached_tokens == 12 and plan.prefill_tokens == 4  # capped at 15 -> 3 blocks


def test_a_request_short_of_blocks_preempts_the_last_running_one() -> None:
    s = _scheduler(num_blocks=5, block_size=2, max_num_seqs=2)  # 4 usable blocks
    a, b = _request("a", (1, 2, 3), max_tokens=8), _request("b", (4, 5, 6), max_tokens=8)
    s.add(a)
    s.add(b)
    now = 0.0
    plan = s.schedule(now)
    assert len(plan.admitted) == 2  # 2 blocks each: the cache is full
    now += plan.duration_s
    s.finish_step(plan, now)  # both have 4 tokens, 3 computed
    plan = s.schedule(now)  # computing token 4 fits in 2 blocks
    assert not plan.preempted
    now += plan.duration_s
    s.finish_step(plan, now)
    plan = s.schedule(now)  # a needs a 3rd block: b is preempted
    assert plan.preempted == (b,) and plan.admitted == ()
    assert b.status == "waiting" and b.num_computed == 0 and b.num_preemptions == 1
    assert list(s.waiting) == [b] and s.cache.blocks_of("b") == 0
    assert [r.request_id for r, _ in plan.entries] == ["a"]


def test_abort_frees_blocks_and_forgets_the_request() -> None:
    s = _scheduler()
    s.add(_request("a", tuple(range(9))))
    s.schedule(0.0)
    done = s.abort("a", 0.25)
    assert done.reason == "abort" and s.cache.usage == 0.0 and not s.has_work
    with pytest.raises(KeyError):
        s.abort("a", 0.5)


# -- the engine loop in virtual time ----------------------------------------------------------


async def _first_token_time(engine: SimEngine, prompt: tuple[int, ...], max_tokens: int) -> float:
    stream = engine.submit(prompt, max_tokens)
    await stream.tokens.receive()
    return trio.current_time() - stream.request.arrival_s


async def _drain(engine: SimEngine, prompt: tuple[int, ...], max_tokens: int) -> list[float]:
    stream = engine.submit(prompt, max_tokens)
    times = []
    async for _ in stream.tokens:
        times.append(trio.current_time())
    return times


async def test_a_cache_hit_shortens_time_to_first_token_exactly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = _engine()
    prompt = tuple(range(16))
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        start = trio.current_time()
        assert await _drain(engine, prompt, 3) == [start + 1.0, start + 1.5, start + 2.0]
        # 12 of 16 tokens hit (capped one short of the prompt): 4 computed, 1/4 s.
        assert await _first_token_time(engine, prompt, 1) == 0.25
        nursery.cancel_scope.cancel()


async def test_overload_queues_requests_fifo(autojump_clock: trio.testing.MockClock) -> None:
    engine = _engine(max_num_seqs=1)
    results: dict[str, list[float]] = {}

    async def client(name: str, prompt: tuple[int, ...]) -> None:
        results[name] = await _drain(engine, prompt, 2)

    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        start = trio.current_time()
        async with trio.open_nursery() as clients:
            clients.start_soon(client, "a", tuple(range(16)))
            await trio.testing.wait_all_tasks_blocked()
            clients.start_soon(client, "b", tuple(range(100, 116)))
        nursery.cancel_scope.cancel()
    assert results["a"] == [start + 1.0, start + 1.5]
    assert results["b"] == [start + 2.5, start + 3.0]  # waited for a, then its own prefill


async def test_concurrent_decodes_share_a_step(autojump_clock: trio.testing.MockClock) -> None:
    engine = _engine(max_num_seqs=2)
    results: list[list[float]] = []

    async def client(prompt: tuple[int, ...]) -> None:
        results.append(await _drain(engine, prompt, 3))

    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        start = trio.current_time()
        async with trio.open_nursery() as clients:
            clients.start_soon(client, (1, 2, 3, 4))
            clients.start_soon(client, (5, 6, 7, 8))
        nursery.cancel_scope.cancel()
    # One step prefills both (8 tokens, 1/2 s); each decode step of two costs 3/4 s.
    assert results == [[start + 0.5, start + 1.25, start + 2.0]] * 2


async def test_slow_and_hang_faults(autojump_clock: trio.testing.MockClock) -> None:
    engine = _engine()
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        engine.set_faults(FaultState(slow_factor=3))
        assert await _first_token_time(engine, tuple(range(16)), 1) == 3.0
        engine.set_faults(FaultState(hang=True))
        stream = engine.submit(tuple(range(50, 66)), 1)
        with trio.move_on_after(1000) as waited:
            await stream.tokens.receive()
        assert waited.cancelled_caught  # nothing in 1000 virtual seconds
        hung_until = trio.current_time()
        engine.set_faults(FaultState())
        await stream.tokens.receive()
        assert trio.current_time() == hung_until + 1.0
        nursery.cancel_scope.cancel()


async def test_abort_in_the_middle_of_a_step_frees_everything(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = _engine()
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        stream = engine.submit(tuple(range(16)), 10)
        await stream.tokens.receive()  # the engine now sleeps through a decode step
        await trio.sleep(0.25)
        engine.abort(stream.request.request_id)
        assert engine.scheduler.cache.usage == 0.0 and not engine.scheduler.has_work
        with pytest.raises(trio.EndOfChannel):
            await stream.tokens.receive()
        await engine.wait_step()  # the step ends without the aborted request
        assert engine.scheduler.cache.usage == 0.0
        # the engine goes on serving
        assert await _first_token_time(engine, tuple(range(200, 204)), 1) == 0.25
        nursery.cancel_scope.cancel()


async def test_sampling_seed_makes_output_a_function_of_the_prompt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = _engine()

    async def tokens(seed: int | None) -> list[int]:
        stream = engine.submit((1, 2, 3), 5, sampling_seed=seed)
        return [out.token_id async for out in stream.tokens]

    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        assert await tokens(7) == await tokens(7)
        assert await tokens(None) != await tokens(None)
        nursery.cancel_scope.cancel()
