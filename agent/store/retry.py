"""When to try a failed model fetch again: exponential backoff from failures and ``now``. Sans-I/O.

Every :class:`~fleet.agent.store.errors.StoreError` is retried, a 404 or a checksum mismatch
included: an operator fixes a source by uploading, and the engine should then start on its own.
The delay grows so a bad source costs little: ``base_s × factor^(failures-1)``, capped at
``max_s``, with up to ``jitter`` of it taken off at random so nodes do not retry in step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from fleet.protocol.errors import ConfigError


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff of model fetches.

    Attributes:
        base_s: the delay after the first failure.
        factor: growth per further failure (>= 1).
        max_s: the longest delay.
        jitter: the share of a delay (0..1) that may be taken off at random.
    """

    base_s: float = 2.0
    factor: float = 2.0
    max_s: float = 300.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if not self.base_s > 0:
            raise ConfigError("base_s", self.base_s, "must be > 0")
        if not self.factor >= 1:
            raise ConfigError("factor", self.factor, "must be >= 1")
        if not self.max_s >= self.base_s:
            raise ConfigError("max_s", self.max_s, "must be >= base_s")
        if not 0 <= self.jitter <= 1:
            raise ConfigError("jitter", self.jitter, "must be within 0..1")

    def delay_s(self, failures: int, rng: random.Random | None = None) -> float:
        """The wait after ``failures`` failures in a row (0 before any failure).

        Args:
            failures: consecutive failures so far.
            rng: jitter source; None = no jitter (the longest delay).
        """
        if failures <= 0:
            return 0.0
        exp = min(failures - 1, 64)  # past 64 doublings any cap has long been reached
        delay = min(self.max_s, self.base_s * self.factor**exp)
        if rng is not None and self.jitter:
            delay -= delay * self.jitter * rng.random()
        return float(delay)

    def next_attempt_at(self, failures: int, now: float, rng: random.Random | None = None) -> float:
        """The time of the next attempt after ``failures`` failures, the last at ``now``."""
        return now + self.delay_s(failures, rng)


__all__ = ["RetryPolicy"]
