"""Limits that hold fleet-wide: per-key rate limits and per-model queue bounds.

Several coordinators serve one fleet. A key limited to R requests/s, or a model's queue bounded
at Q waiters, must mean R and Q for the fleet, not for each coordinator. Two implementations:

* :class:`LocalLimits` (no Redis): each of the ``coordinators`` expected coordinators enforces
  its share, R/N requests/s (burst/N, at least 1) and Q/N waiters (at least 1). Exact when the
  coordinators share the load evenly (one port, or a Service spreading connections); a key whose
  requests all reach one coordinator gets only R/N.
* :class:`fleet.coordinator.redislimits.RedisLimits` (``--redis-url``): one token bucket per key
  and one waiter count per model in Redis, shared by every coordinator; it falls back to the
  local share while Redis cannot be reached.

This module is the sans-I/O part: the token bucket, the local queue ledger, and the health
state that decides when Redis is tried again. Times are seconds on any monotonic clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import trio

from fleet.protocol.errors import ConfigError

if TYPE_CHECKING:
    from .apikeys import ApiKey


@dataclass
class TokenBucket:
    """``rate`` requests/s with bursts of ``burst``; starts full.

    Args:
        rate: tokens added per second (> 0).
        burst: most tokens held (>= 1).
    """

    rate: float
    burst: float
    tokens: float = field(default=0.0, repr=False)
    stamp: float | None = field(default=None, repr=False)

    def take(self, now: float) -> float:
        """Spend one token; return 0, or the seconds until one is there (nothing spent)."""
        if self.stamp is None:
            self.tokens = self.burst
        else:
            self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


def share(value: float, coordinators: int) -> float:
    """One coordinator's part of a fleet-wide figure: ``value / coordinators``, at least 1."""
    return max(1.0, value / coordinators)


class QueueLedger:
    """This coordinator's waiters per model, and the local bound on them.

    Args:
        limit: waiters per model this coordinator may hold on its own (its share of
            ``max_queue``, or all of it when alone).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: dict[str, int] = {}
        self.version = 0  # bumped on every change: what a publisher has sent is stale

    def add(self, model: str) -> int:
        """Count one more waiter of ``model``; its new count."""
        self.counts[model] = self.counts.get(model, 0) + 1
        self.version += 1
        return self.counts[model]

    def remove(self, model: str) -> None:
        """Count one waiter of ``model`` less."""
        left = self.counts.get(model, 0) - 1
        if left < 0:
            raise RuntimeError(f"queue ledger of {model!r} went below 0")
        self.counts[model] = left
        self.version += 1

    def fits(self, model: str) -> bool:
        """Whether the count of ``model`` (its new waiter included) is within the limit."""
        return self.counts.get(model, 0) <= self.limit


@dataclass
class RedisHealth:
    """Whether to ask Redis now: after a failure, not again for ``retry_s`` (requests use the
    local share meanwhile; the heartbeat keeps probing)."""

    retry_s: float = 1.0
    up: bool = True
    retry_at: float = 0.0
    failures: int = 0

    def usable(self, now: float) -> bool:
        return self.up or now >= self.retry_at

    def failed(self, now: float) -> None:
        self.up = False
        self.retry_at = now + self.retry_s
        self.failures += 1

    def ok(self) -> None:
        self.up = True


class SharedLimits(Protocol):
    """What the coordinator asks of fleet-wide limits."""

    async def take(self, key: ApiKey, now: float) -> float:
        """Spend one request of ``key``; 0, or the seconds until one is allowed."""
        ...

    async def reserve(self, model: str) -> bool:
        """Count one more waiter of ``model`` if the fleet-wide queue has room; whether it
        had (nothing is counted when not)."""
        ...

    def release(self, model: str) -> None:
        """A waiter counted by :meth:`reserve` left the queue (admitted, shed or gone)."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the shared state up (heartbeats); returns at once when there is none."""
        ...


class LocalLimits:
    """Each coordinator enforces its share of the fleet-wide figures (module docstring).

    Args:
        max_queue: the fleet-wide waiters per model.
        coordinators: how many coordinators share the fleet (``--coordinators-expected``).

    Raises:
        ConfigError: ``coordinators`` below 1.
    """

    def __init__(self, max_queue: int, coordinators: int = 1) -> None:
        if coordinators < 1:
            raise ConfigError("coordinators_expected", coordinators, "must be >= 1")
        self.coordinators = coordinators
        self.ledger = QueueLedger(int(share(max_queue, coordinators)))
        self._buckets: dict[str, TokenBucket] = {}

    def take_now(self, key: ApiKey, now: float) -> float:
        """:meth:`take`, synchronously."""
        if key.requests_per_s is None:
            return 0.0
        bucket = self._buckets.get(key.name)
        if bucket is None:
            bucket = TokenBucket(
                key.requests_per_s / self.coordinators, share(key.burst, self.coordinators)
            )
            self._buckets[key.name] = bucket
        return bucket.take(now)

    async def take(self, key: ApiKey, now: float) -> float:
        return self.take_now(key, now)

    def reserve_now(self, model: str) -> bool:
        """:meth:`reserve`, synchronously."""
        self.ledger.add(model)
        if self.ledger.fits(model):
            return True
        self.ledger.remove(model)
        return False

    async def reserve(self, model: str) -> bool:
        return self.reserve_now(model)

    def release(self, model: str) -> None:
        self.ledger.remove(model)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()


def retry_after_s(wait_s: float) -> int:
    """A ``Retry-After`` in whole seconds for a wait (at least 1)."""
    return max(1, math.ceil(wait_s))


__all__ = [
    "LocalLimits",
    "QueueLedger",
    "RedisHealth",
    "SharedLimits",
    "TokenBucket",
    "retry_after_s",
    "share",
]
