"""Engine process faults under load: ``engine-sigkill`` and ``engine-hang``.

Beside the background load, both start long streams (``LONG_STREAMS_PER_ENGINE`` per engine,
``LONG_STREAM_TOKENS`` tokens each) and, once every one has its response headers, fault the
engine serving most of them, so that started streams are cut (SIGKILL) or stalled (SIGSTOP) for
sure (``streams_hit``). They watch it (:class:`~fleet.chaos.target.Watcher`) and report:

- ``detect_s``: fault → the engine leaves routing (registry state not ready, or breaker open);
- ``ready_s``: fault (SIGKILL) or heal (SIGCONT) → the registry says ready again (with a new
  pid after a SIGKILL);
- ``recover_s``: fault (SIGKILL) or heal (SIGCONT) → the first request sent after it and served
  by that engine (its breaker, if it opened, must have let it back in);
- ``streams_resumed``: streams the coordinator continued on another engine;
- ``coordinator``: how much the coordinator's retry, error, stall and resume counters grew.
"""

from __future__ import annotations

import collections
import dataclasses
import signal
from collections.abc import Callable
from typing import Any

import trio

from .errors import ChaosError
from .load import Load, background, plan, run_clock, send
from .outcomes import Outcome, Record, figures, since
from .scenarios import ChaosConfig, Figures, load_spec
from .target import Metrics, Target, Watcher, deltas, signal_engine, stopped

LONG_STREAMS_PER_ENGINE = 2
LONG_STREAM_TOKENS = 96
LONG_STREAM_DEADLINE_S = 30.0  # x-request-timeout of the long streams (see LongStreams)
COUNTERS = (
    "fleet_retries_total",
    "fleet_upstream_errors_total",
    "fleet_engine_stalls_total",
    "fleet_stream_resumes_total",
    "fleet_requests_shed_total",
    "fleet_retry_budget_exhausted_total",
)


class LongStreams:
    """Long streams beside a load, judged like its requests.

    Args:
        load: the load (its client, spec and clock are used).
        count: how many.

    Resource handling: :meth:`run` owns the streams' tasks and returns when all have ended.
    """

    def __init__(self, load: Load, count: int) -> None:
        self.load = load
        self.count = count
        # A long generation's client allows for its length: these streams take about as long
        # as the load's deadline (5 s: ~96 tokens on the chaos fleet's engines), and a stream
        # may only be resumed before its deadline, so one that broke late missed it whenever
        # finding the break (a silent engine: 1 s, then a health probe of up to 2 s) took
        # longer on a busy machine (CI: one stream in test_chaos_netns).
        deadline = load.spec.deadline_s
        self.spec = dataclasses.replace(
            load.spec,
            max_tokens=LONG_STREAM_TOKENS,
            stream_share=1.0,
            tag=load.spec.tag + "-long",
            deadline_s=None if deadline is None else max(deadline, LONG_STREAM_DEADLINE_S),
        )
        self.on_engine: collections.Counter[str] = collections.Counter()
        self.records: list[Record] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the streams; ``started()`` once each has its headers (or 5 s passed)."""
        all_started = trio.Event()

        def started(headers: dict[str, str]) -> None:
            self.on_engine[headers.get("x-selected-pod", "")] += 1
            if sum(self.on_engine.values()) == self.count:
                all_started.set()

        async def one(index: int) -> None:
            request = plan(self.spec, index)
            self.records.append(
                await send(self.load.http, request, self.load.clock, on_start=started)
            )

        async with trio.open_nursery() as nursery:
            for i in range(self.count):
                nursery.start_soon(one, i)
            with trio.move_on_after(5.0):
                await all_started.wait()
            task_status.started()


async def victim(target: Target, streams: LongStreams) -> dict[str, Any]:
    """The ready engine serving most of ``streams`` (the first by id on a tie).

    Raises:
        ChaosError: fewer than two ready engines (a fault would leave none healthy).
    """
    ready = [e for e in await target.engines() if e["state"] == "ready" and e["pid"]]
    if len(ready) < 2:
        raise ChaosError(f"need two ready engines with a pid, have {len(ready)}")
    ready.sort(key=lambda e: str(e["id"]))
    return max(ready, key=lambda e: streams.on_engine.get(e["id"], 0))


async def kill_and_watch(
    target: Target,
    load: Load,
    engine_id: str,
    cfg: ChaosConfig,
    kill: Callable[[], None],
    old_pids: set[int],
) -> tuple[float, float | None, float | None]:
    """Run ``kill`` while watching ``engine_id``; wait until it is ready again in a process not
    in ``old_pids`` and has served a request sent after the kill.

    Returns:
        When the kill was sent, when the engine left routing, when it was ready again (on
        ``load``'s clock; None: not within the scenario's timeouts).
    """
    clock = load.clock
    watcher = Watcher(target, engine_id, clock)
    async with trio.open_nursery() as inner:
        await inner.start(watcher.run)
        fault_t = clock()
        kill()
        detect_t = await watcher.when(
            lambda s: s.t >= fault_t and not s.routed, cfg.detect_timeout_s
        )
        ready_t = await watcher.when(
            lambda s: s.t >= fault_t and s.state == "ready" and s.pid not in {0, *old_pids},
            cfg.recover_timeout_s,
        )
        inner.cancel_scope.cancel()
    await load.until(
        lambda _: _served_after(load, engine_id, fault_t) is not None, cfg.recover_timeout_s
    )
    return fault_t, detect_t, ready_t


def _served_after(load: Load, engine_id: str, after: float) -> float | None:
    """When the first request sent at or after ``after`` and served by ``engine_id`` ended."""
    ends = [
        r.end_s
        for r in load.records
        if r.pod == engine_id and r.start_s >= after and r.outcome is Outcome.SUCCEEDED
    ]
    return min(ends) if ends else None


def _figures(load: Load, streams: LongStreams, engine_id: str) -> dict[str, Any]:
    """Counts over every request, long streams included; latencies of the background load
    only (a long stream takes ten times as long)."""
    background = figures(load.records)
    out = figures(load.records + streams.records)
    out.update(p50_ms=background["p50_ms"], p99_ms=background["p99_ms"])
    out["long_streams"] = streams.count
    out["streams_hit"] = streams.on_engine.get(engine_id, 0)
    outcomes = collections.Counter(r.outcome.value for r in streams.records)
    out["long_stream_outcomes"] = dict(outcomes)
    return out


def _coordinator(before: Metrics, after: Metrics) -> dict[str, Any]:
    grew = deltas(before, after, COUNTERS)
    resumed = grew.get("fleet_stream_resumes_total{outcome=resumed}", 0.0)
    return {"streams_resumed": int(resumed), "coordinator": grew}


async def engine_sigkill(target: Target, cfg: ChaosConfig) -> Figures:
    """SIGKILL the engine serving most long streams; wait until it is restarted and serves."""
    clock = run_clock()
    before = await target.metrics()
    async with background(target.url, load_spec(target, cfg, "sigkill"), clock) as load:
        await trio.sleep(cfg.warmup_s)
        streams = LongStreams(load, LONG_STREAMS_PER_ENGINE * len(await target.engines()))
        async with trio.open_nursery() as outer:
            await outer.start(streams.run)
            engine = await victim(target, streams)
            engine_id, old_pid = str(engine["id"]), int(engine["pid"])
            fault_t, detect_t, ready_t = await kill_and_watch(
                target, load, engine_id, cfg, lambda: signal_engine(old_pid, signal.SIGKILL),
                {old_pid},
            )  # fmt: skip
        await trio.sleep(cfg.tail_s)
    after = await target.metrics()
    new = await target.engine(engine_id)
    return {
        **_figures(load, streams, engine_id),
        "detect_s": since(detect_t, fault_t),
        "recover_s": since(_served_after(load, engine_id, fault_t), fault_t),
        "ready_s": since(ready_t, fault_t),
        "engine": engine_id,
        "old_pid": old_pid,
        "new_pid": new["pid"] if new else None,
        **_coordinator(before, after),
    }


async def engine_hang(target: Target, cfg: ChaosConfig) -> Figures:
    """SIGSTOP the engine serving most long streams until the fleet noticed and the requests'
    deadline passed, then SIGCONT it; wait until it serves again.

    Requests on it meanwhile must get a clear error (504 at their deadline) or be answered
    elsewhere; streams it had started are resumed elsewhere, or continue when it does.
    """
    clock = run_clock()
    before = await target.metrics()
    async with background(target.url, load_spec(target, cfg, "hang"), clock) as load:
        await trio.sleep(cfg.warmup_s)
        streams = LongStreams(load, LONG_STREAMS_PER_ENGINE * len(await target.engines()))
        async with trio.open_nursery() as outer:
            await outer.start(streams.run)
            engine = await victim(target, streams)
            engine_id, pid = str(engine["id"]), int(engine["pid"])
            watcher = Watcher(target, engine_id, clock)
            async with trio.open_nursery() as inner:
                await inner.start(watcher.run)
                async with stopped(pid):
                    fault_t = clock()
                    detect_t = await watcher.when(
                        lambda s: s.t >= fault_t and not s.routed, cfg.detect_timeout_s
                    )
                    hold_until = max(clock(), fault_t + cfg.deadline_s + 0.5)
                    await trio.sleep(max(0.0, hold_until - clock()))
                    heal_t = clock()
                ready_t = await watcher.when(
                    lambda s: s.t >= heal_t and s.routed, cfg.recover_timeout_s
                )
                inner.cancel_scope.cancel()
            await load.until(
                lambda _: _served_after(load, engine_id, heal_t) is not None,
                cfg.recover_timeout_s,
            )
        await trio.sleep(cfg.tail_s)
    after = await target.metrics()
    new = await target.engine(engine_id)
    records = load.records + streams.records
    statuses = collections.Counter(str(r.status) for r in records if r.outcome is Outcome.FAILED)
    return {
        **_figures(load, streams, engine_id),
        "detect_s": since(detect_t, fault_t),
        "recover_s": since(_served_after(load, engine_id, heal_t), heal_t),
        "ready_s": since(ready_t, heal_t),
        "stopped_s": round(heal_t - fault_t, 3),
        "engine": engine_id,
        "restarted": bool(new and new["pid"] != pid),
        "failed_by_status": dict(statuses),
        **_coordinator(before, after),
    }


__all__ = ["LongStreams", "engine_hang", "engine_sigkill", "victim"]
