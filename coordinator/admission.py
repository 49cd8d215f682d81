"""Admission control: per-model concurrency slots, bounded priority queues, shedding.

Each model may have ``slots_per_engine`` × (its routable engines) requests in flight. A request
beyond that waits in the model's queue, ordered by priority (``x-priority``: ``critical``,
``high``, ``standard`` (default), ``batch``), first come first served within a priority. The queue
holds at most ``max_queue`` requests (default 500): when it is full, a new request of higher
priority than the lowest-priority waiter takes its place (that waiter is shed), otherwise the new
request is shed. A shed request gets 503 with ``Retry-After``. A model with no ready engine (it
is starting, or scaling from zero) has no slots: its requests wait in the queue until an engine
is ready or their deadline passes (then 503 with ``Retry-After``). Every waiter is answered:
admitted, shed, or timed out.

``max_queue`` is the fleet's: with several coordinators the waiters are counted by
:mod:`.sharedlimits` (in Redis, or each coordinator holding its share). A full fleet-wide queue
lets a request displace a lower-priority waiter of the coordinator it reached, not of another.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .errors import ApiError, InvalidRequest
from .sharedlimits import LocalLimits, SharedLimits

PRIORITIES = {"critical": 0, "high": 1, "standard": 2, "batch": 3}
PRIORITY_HEADER = "x-priority"


class Overloaded(ApiError):
    """The request was shed: the model's queue is full (503 with ``Retry-After``)."""

    status = 503
    type = "service_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, code="overloaded", retry_after_s=retry_after_s)


def priority_of(headers: dict[str, str], tier: int | None = None) -> int:
    """The request's priority class (lower is more urgent): ``x-priority``, else ``tier`` (an
    API key's), else standard. A header may make a request less urgent than its key's tier,
    never more.

    Raises:
        InvalidRequest: an unknown ``x-priority`` value.
    """
    raw = headers.get(PRIORITY_HEADER)
    if raw is None:
        return PRIORITIES["standard"] if tier is None else tier
    value = PRIORITIES.get(raw.strip().lower())
    if value is None:
        raise InvalidRequest(
            f"`{PRIORITY_HEADER}` must be one of {list(PRIORITIES)}, got {raw!r}.",
            param=PRIORITY_HEADER,
        )
    return value if tier is None else max(value, tier)


@dataclass
class WaitEstimate:
    """How long a response takes to start, and how far that wanders: a smoothed mean and mean
    deviation of observed waits (Jacobson's estimator, TCP's retransmission timeout in RFC 6298).

    Sans-I/O: :meth:`record` each observed wait; :meth:`allows` says whether a request with so
    much time left before its deadline should still be sent. The mean alone lags a queue that is
    growing and says nothing of a jittery engine; the deviation term widens the bound exactly
    when waits wander.
    """

    mean_s: float | None = None
    deviation_s: float = 0.0
    gain: float = 0.2  # weight of a new sample in the mean
    deviation_gain: float = 0.25  # ... and in the deviation
    deviations: float = 4.0  # how many deviations the bound adds to the mean
    margin: float = 1.5  # ... and the bound is at least this many means

    def record(self, took_s: float) -> None:
        """Take one observed wait (seconds)."""
        if self.mean_s is None:
            self.mean_s, self.deviation_s = took_s, took_s / 2
            return
        error = took_s - self.mean_s
        self.deviation_s += self.deviation_gain * (abs(error) - self.deviation_s)
        self.mean_s += self.gain * error

    def bound_s(self) -> float:
        """The wait to allow for: the mean plus ``deviations`` deviations, at least ``margin``
        means (0 before any sample)."""
        if self.mean_s is None:
            return 0.0
        return max(self.margin * self.mean_s, self.mean_s + self.deviations * self.deviation_s)

    def allows(self, remaining_s: float) -> bool:
        """Whether a response started now would likely start within ``remaining_s``."""
        return remaining_s >= self.bound_s()


@dataclass(order=True)
class _Waiter:
    priority: int
    seq: int
    event: trio.Event = field(compare=False, default_factory=trio.Event)
    outcome: str = field(compare=False, default="")  # "admitted" or "shed"


@dataclass
class _ModelQueue:
    inflight: int = 0
    waiters: list[_Waiter] = field(default_factory=list)  # a heap


class Admission:
    """Slots and queues of every model.

    Args:
        engines_of: the number of routable engines of a model, now.
        slots_per_engine: requests in flight per engine before requests queue.
        held_elsewhere: the model's requests in flight on engines that left routing (draining
            after a scale-down, or down): their slots are not the routable engines' (default
            none), so a request never waits for a drain while a routable engine is free.
        max_queue: waiters per model (when ``limits`` is not given).
        on_change: called with (model, queued) when a queue's length changes (metrics).
        limits: counts waiters against the fleet-wide bound (default: this coordinator's
            queue alone, ``max_queue``).
    """

    def __init__(
        self,
        engines_of: Callable[[str], int],
        *,
        slots_per_engine: int = 64,
        max_queue: int = 500,
        on_change: Callable[[str, int], None] | None = None,
        limits: SharedLimits | None = None,
        held_elsewhere: Callable[[str], int] = lambda model: 0,
    ) -> None:
        self.engines_of = engines_of
        self.held_elsewhere = held_elsewhere
        self.slots_per_engine = slots_per_engine
        self.max_queue = max_queue
        self.on_change = on_change
        self.limits = limits or LocalLimits(max_queue)
        self._queues: dict[str, _ModelQueue] = {}
        self._seq = itertools.count()
        self.shed = 0

    def queued(self, model: str) -> int:
        q = self._queues.get(model)
        return len(q.waiters) if q else 0

    def queued_counts(self) -> dict[str, int]:
        """Every model with requests waiting, and how many."""
        return {m: len(q.waiters) for m, q in self._queues.items() if q.waiters}

    def queued_by_priority(self) -> dict[tuple[str, str], int]:
        """Requests waiting, by (model, priority name); models with none are left out."""
        names = {v: k for k, v in PRIORITIES.items()}
        out: dict[tuple[str, str], int] = {}
        for model, q in self._queues.items():
            for w in q.waiters:
                key = (model, names.get(w.priority, str(w.priority)))
                out[key] = out.get(key, 0) + 1
        return out

    def inflight(self, model: str) -> int:
        q = self._queues.get(model)
        return q.inflight if q else 0

    def _capacity(self, model: str) -> int:
        return self.engines_of(model) * self.slots_per_engine + self.held_elsewhere(model)

    def admit(self, model: str, priority: int, deadline: float = math.inf) -> Slot:
        """One of the model's slots, held for the body of an ``async with``, which gets
        whether the request waited in the queue for it.

        Raises (on entering):
            Overloaded: shed (queue full), or the deadline passed while waiting.
        """
        return Slot(self, model, priority, deadline)

    async def _wait(self, model: str, q: _ModelQueue, priority: int, deadline: float) -> None:
        waiter = _Waiter(priority, next(self._seq))
        if not await self.limits.reserve(model):  # full: take a less urgent waiter's place
            lowest = max(q.waiters) if q.waiters else None
            if lowest is None or lowest.priority <= priority:
                self.shed += 1
                raise Overloaded(
                    f"The queue for `{model}` is full ({self.max_queue} waiting); retry shortly.",
                    retry_after_s=2,
                )
            q.waiters.remove(lowest)  # its place in the count passes to the new waiter
            heapq.heapify(q.waiters)
            lowest.outcome = "shed"
            lowest.event.set()
        heapq.heappush(q.waiters, waiter)
        self._changed(model, q)
        self.wake(model)  # a slot may have come free while the count was asked
        try:
            with trio.move_on_at(deadline):
                await waiter.event.wait()
        except BaseException:  # cancelled (the client left): give back what we hold
            self._leave(model, q, waiter)
            raise
        if waiter.outcome == "admitted":
            return
        self._leave(model, q, waiter)
        self.shed += 1
        if waiter.outcome == "shed":
            raise Overloaded(
                f"Shed from the full queue of `{model}` by higher-priority requests; retry "
                "shortly.",
                retry_after_s=2,
            )
        raise Overloaded(
            f"`{model}` had no free engine before the request's deadline; retry shortly.",
            retry_after_s=5,
        )

    def _leave(self, model: str, q: _ModelQueue, waiter: _Waiter) -> None:
        if waiter.outcome == "admitted":  # admitted, but not taken: free the slot again
            q.inflight -= 1
            self.wake(model)
        elif waiter in q.waiters:
            q.waiters.remove(waiter)
            heapq.heapify(q.waiters)
            self.limits.release(model)
            self._changed(model, q)

    def wake(self, model: str) -> None:
        """Admit waiters while the model has free slots (call when engines become ready)."""
        q = self._queues.get(model)
        if q is None:
            return
        woke = False
        while q.waiters and q.inflight < self._capacity(model):
            waiter = heapq.heappop(q.waiters)
            self.limits.release(model)
            waiter.outcome = "admitted"
            q.inflight += 1
            waiter.event.set()
            woke = True
        if woke:
            self._changed(model, q)

    def wake_all(self) -> None:
        for model in list(self._queues):
            self.wake(model)

    def _changed(self, model: str, q: _ModelQueue) -> None:
        if self.on_change is not None:
            self.on_change(model, len(q.waiters))


class Slot:
    """A model's slot (:meth:`Admission.admit`): taken on entering, maybe after a wait in the
    queue; given back on leaving. A class, not a generator: every request enters one."""

    __slots__ = ("_admission", "_model", "_priority", "_deadline", "_queue")

    def __init__(self, admission: Admission, model: str, priority: int, deadline: float) -> None:
        self._admission = admission
        self._model = model
        self._priority = priority
        self._deadline = deadline
        self._queue: _ModelQueue | None = None

    async def __aenter__(self) -> bool:
        admission, model = self._admission, self._model
        q = admission._queues.setdefault(model, _ModelQueue())
        queued = bool(q.waiters) or q.inflight >= admission._capacity(model)
        if queued:
            await admission._wait(model, q, self._priority, self._deadline)
        else:
            q.inflight += 1
        self._queue = q
        return queued

    async def __aexit__(self, *exc_info: object) -> None:
        q, self._queue = self._queue, None
        if q is not None:
            q.inflight -= 1
            self._admission.wake(self._model)


__all__ = [
    "PRIORITIES",
    "PRIORITY_HEADER",
    "Admission",
    "Overloaded",
    "Slot",
    "WaitEstimate",
    "priority_of",
]
