"""A fleet of simulated engines serving a fast-forwarded day, in virtual time: sans-I/O.

Each engine is the simulator's own continuous-batching core (:class:`~fleet.agent.sim.
scheduler.Scheduler` with its step-time model), on a GPU tier that runs its steps
``slow_factor`` times slower than the simulator's H100 model and costs ``price`` dollars an
hour from the moment it is started (cold start included) until it stops. :class:`DaySim` is
one event loop (the next arrival, the next step end, the next engine ready, the next
autoscaler tick), no clock and no sleeps:

* a request goes to the ready engine with the fewest requests in flight per unit of speed;
  with no engine ready it waits in the admission queue, failing after ``deadline_s``;
* a :class:`~.daytiers.Policy` says every ``tick_day_s`` how many engines of each tier
  should run; new engines serve after ``cold_start_day_s``; an engine to remove first
  cancels a cold start, else drains (leaves routing, finishes its requests, then stops and
  stops costing); a ready engine is drained only once the engines left ready cover the
  units wanted (make before break), and a draining engine is taken back before a new one
  is started.

Day-clock durations (``cold_start_day_s``, ``tick_day_s``, the autoscaler's windows) are
divided by the day's compression; the engines' own step times are not.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from fleet.agent.sim.cache import PrefixCache
from fleet.agent.sim.latency import LatencyModel
from fleet.agent.sim.scheduler import Scheduler, SimRequest, StepPlan

from .daydata import Arrival
from .daytiers import Policy, Tier

EngineState = Literal["starting", "ready", "draining", "stopped"]


@dataclass(frozen=True)
class FleetConfig:
    """Settings of a simulated day; ``*_day_s`` are day-clock seconds (compressed alike)."""

    compression: float
    cold_start_day_s: float = 45.0
    tick_day_s: float = 2.0
    deadline_s: float = 60.0  # how long a request may wait for an engine (simulated seconds)
    max_num_seqs: int = 256
    max_batched_tokens: int = 8192
    num_blocks: int = 16384


@dataclass(frozen=True)
class Served:
    """One measured request: arrival (simulated s), TTFT, TPOT (None for one token)."""

    arrival: float
    ttft: float
    tpot: float | None


@dataclass
class DayResult:
    """What a day cost and how its requests fared."""

    served: list[Served] = field(default_factory=list)
    failed: int = 0
    dollars: float = 0.0
    engine_hours: dict[str, float] = field(default_factory=dict)
    timeline: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    decisions: int = 0  # changes of the wanted mix


class Engine:
    """One simulated engine on a tier, from its start to its stop."""

    def __init__(self, engine_id: int, tier: Tier, cfg: FleetConfig, started: float) -> None:
        self.id = engine_id
        self.tier = tier
        cache = PrefixCache(
            block_size=16,
            num_blocks=cfg.num_blocks,
            hash_seed="simday",
            enable_caching=False,
            events_enabled=False,
        )
        self.scheduler = Scheduler(
            cache,
            LatencyModel(),
            max_num_seqs=cfg.max_num_seqs,
            max_batched_tokens=cfg.max_batched_tokens,
        )
        self.state: EngineState = "starting"
        self.started = started
        self.stopped: float | None = None
        self.plan: StepPlan | None = None

    @property
    def in_flight(self) -> int:
        """Requests waiting or running on the engine."""
        return len(self.scheduler.waiting) + len(self.scheduler.running)

    @property
    def load(self) -> float:
        """Requests in flight per unit of speed (what routing compares)."""
        return self.in_flight / self.tier.speed


class DaySim:
    """Serve ``arrivals`` with the engines ``policy`` asks for; :meth:`run` once.

    Args:
        tiers: the GPU tiers.
        cfg: settings.
        policy: decides engines per tier every tick.
        arrivals: sorted; those before 0 are warm-up (served, not measured, not billed).
        duration_s: the measured day ends here (simulated seconds); later work is finished
            but not billed, and the policy no longer ticks.
        initial: engines per tier ready when the warm-up starts.
    """

    def __init__(
        self,
        tiers: Sequence[Tier],
        cfg: FleetConfig,
        policy: Policy,
        arrivals: Sequence[Arrival],
        *,
        duration_s: float,
        initial: Mapping[str, int],
    ) -> None:
        self.tiers = {t.name: t for t in tiers}
        self.cfg = cfg
        self.policy = policy
        self.arrivals = arrivals
        self.duration_s = duration_s
        self.start = min(0.0, arrivals[0].t) if arrivals else 0.0
        self.engines: list[Engine] = []  # not stopped
        self.retired: list[Engine] = []
        self.queue: deque[int] = deque()  # arrival indexes waiting for an engine
        self.result = DayResult()
        self._events: list[tuple[float, int, str, Engine | None]] = []
        self._seq = itertools.count()
        self._ids = itertools.count()
        self._wanted: dict[str, int] = {}
        for name, n in initial.items():
            for _ in range(n):
                self._start(self.tiers[name], self.start, cold=False)

    def run(self) -> DayResult:
        """Simulate to the end of the day and the last request; the result."""
        cold_start = self.cfg.cold_start_day_s / self.cfg.compression
        tick = self.cfg.tick_day_s / self.cfg.compression
        self._push(self.start, "tick", None)
        i = 0
        while i < len(self.arrivals) or self._events:
            if i < len(self.arrivals) and (
                not self._events or self.arrivals[i].t <= self._events[0][0]
            ):
                self._arrive(i, self.arrivals[i].t)
                i += 1
                continue
            now, _, kind, engine = heapq.heappop(self._events)
            if kind == "step" and engine is not None:
                self._step_done(engine, now)
            elif kind == "ready" and engine is not None and engine.state == "starting":
                engine.state = "ready"
                self._dispatch(now)
            elif kind == "tick" and now < self.duration_s:
                self._tick(now, cold_start)
                self._push(now + tick, "tick", None)
        self.result.failed += sum(1 for i in self.queue if self.arrivals[i].t >= 0)
        self._bill()
        return self.result

    # -- requests ------------------------------------------------------------------------------

    def _arrive(self, index: int, now: float) -> None:
        self.queue.append(index)
        self._dispatch(now)

    def _dispatch(self, now: float) -> None:
        ready = [e for e in self.engines if e.state == "ready"]
        while self.queue and ready:
            index = self.queue.popleft()
            a = self.arrivals[index]
            engine = min(ready, key=lambda e: (e.load, e.id))
            request = SimRequest(str(index), (1,) * a.prompt, a.output, a.t, _token)
            engine.scheduler.add(request)
            self._kick(engine, now)

    def _expire(self, now: float) -> None:
        while self.queue and now - self.arrivals[self.queue[0]].t > self.cfg.deadline_s:
            if self.arrivals[self.queue.popleft()].t >= 0:
                self.result.failed += 1

    def _kick(self, engine: Engine, now: float) -> None:
        if engine.plan is not None or not engine.scheduler.has_work:
            return
        plan = engine.scheduler.schedule(now, slow_factor=engine.tier.slow_factor)
        if not plan.entries:
            raise RuntimeError(f"engine {engine.id} has requests but cannot schedule any")
        engine.plan = plan
        self._push(now + plan.duration_s, "step", engine)

    def _step_done(self, engine: Engine, now: float) -> None:
        plan, engine.plan = engine.plan, None
        assert plan is not None
        for done in engine.scheduler.finish_step(plan, now).finished:
            r = done.request
            if r.arrival_s >= 0 and r.first_token_s is not None:
                tpot = (
                    (done.finished_s - r.first_token_s) / (r.max_tokens - 1)
                    if r.max_tokens > 1
                    else None
                )
                self.result.served.append(Served(r.arrival_s, r.first_token_s - r.arrival_s, tpot))
        self._kick(engine, now)
        if engine.state == "draining" and not engine.scheduler.has_work:
            self._stop(engine, now)

    # -- scaling -------------------------------------------------------------------------------

    def _tick(self, now: float, cold_start: float) -> None:
        self._expire(now)
        demand = len(self.queue) + sum(e.in_flight for e in self.engines)
        wanted = self.policy.wanted(now, demand)
        if wanted != self._wanted:
            self.result.decisions += 1
            self._wanted = dict(wanted)
        want_units = sum(self.tiers[n].speed * c for n, c in wanted.items())
        for tier in self.tiers.values():
            active = [
                e for e in self.engines if e.tier is tier and e.state in ("starting", "ready")
            ]
            extra = len(active) - wanted.get(tier.name, 0)
            for engine in [e for e in self.engines if e.tier is tier and e.state == "draining"]:
                if extra >= 0:
                    break
                engine.state = "ready"  # still up: take it back instead of starting one
                extra += 1
            for _ in range(-extra):
                engine = self._start(tier, now, cold=True)
                self._push(now + cold_start, "ready", engine)
            for engine in [e for e in active if e.state == "starting"][: max(0, extra)]:
                self._stop(engine, now)
                extra -= 1
            ready = sorted((e for e in active if e.state == "ready"), key=lambda e: e.in_flight)
            for engine in ready[: max(0, extra)]:
                if self._ready_units() - tier.speed < want_units:
                    break  # make before break: the replacements are not ready yet
                engine.state = "draining"
                if not engine.scheduler.has_work:
                    self._stop(engine, now)
        counts = self._counts()
        if now >= 0 and (not self.result.timeline or self.result.timeline[-1][1] != counts):
            self.result.timeline.append((now, counts))
        self._dispatch(now)

    def _ready_units(self) -> int:
        return sum(e.tier.speed for e in self.engines if e.state == "ready")

    def _counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.tiers, 0)
        for e in self.engines:
            if e.state in ("starting", "ready", "draining"):
                counts[e.tier.name] += 1
        return counts

    def _start(self, tier: Tier, now: float, *, cold: bool) -> Engine:
        engine = Engine(next(self._ids), tier, self.cfg, now)
        if not cold:
            engine.state = "ready"
        self.engines.append(engine)
        return engine

    def _stop(self, engine: Engine, now: float) -> None:
        engine.state = "stopped"
        engine.stopped = now
        self.engines.remove(engine)
        self.retired.append(engine)

    def _bill(self) -> None:
        hours_per_s = self.cfg.compression / 3600
        hours = dict.fromkeys(self.tiers, 0.0)
        for e in self.engines + self.retired:
            end = self.duration_s if e.stopped is None else min(e.stopped, self.duration_s)
            hours[e.tier.name] += max(0.0, end - max(e.started, 0.0)) * hours_per_s
        self.result.engine_hours = hours
        self.result.dollars = sum(h * self.tiers[n].price for n, h in hours.items())

    def _push(self, at: float, kind: str, engine: Engine | None) -> None:
        heapq.heappush(self._events, (at, next(self._seq), kind, engine))


def _token() -> int:
    return 7


__all__ = ["DayResult", "DaySim", "Engine", "FleetConfig", "Served"]
