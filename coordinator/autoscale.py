"""How many engines a deployment with ``minReplicas``/``maxReplicas`` should run: sans-I/O.

Knative's KPA, as one :class:`Autoscaler` per deployment. The caller samples the deployment's
demand (requests in flight on its engines plus requests queued for it) every tick with
:meth:`Autoscaler.observe`, and asks :meth:`Autoscaler.decide` for the replica count:

* **stable**: ``ceil(mean demand over stable_window_s / target_per_engine)``;
* **panic**: when the mean over the short ``panic_window_s`` needs ``panic_threshold`` times
  the engines running, the count follows the short mean instead, and never goes down while the
  panic lasts (``stable_window_s`` after the last sample that called for it): a burst is met in
  seconds, and the burst's end does not take engines away at once;
* **from zero**: a deployment with no engine and any demand (a request waiting in the queue)
  gets one at once; the request waits in the admission queue for it (up to its deadline);
* **to zero**: with ``minReplicas: 0``, only after no demand at all for ``scale_to_zero_after_s``
  (an idle deployment keeps one engine warm until then);
* always clamped to ``minReplicas``..``maxReplicas``.

Every decision carries its inputs (:class:`Decision`) for logs and metrics.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from fleet.protocol.errors import ConfigError


@dataclass(frozen=True)
class AutoscaleConfig:
    """The autoscaler's settings (the same for every deployment).

    Raises:
        ConfigError: a value out of range (names the key).
    """

    target_per_engine: float = 16.0  # concurrent requests one engine should hold
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0
    scale_to_zero_after_s: float = 300.0

    def __post_init__(self) -> None:
        for key in ("target_per_engine", "stable_window_s", "panic_window_s"):
            if not getattr(self, key) > 0:
                raise ConfigError(key, getattr(self, key), "must be > 0")
        if self.panic_window_s > self.stable_window_s:
            raise ConfigError("panic_window_s", self.panic_window_s, "must be <= stable_window_s")
        if not self.panic_threshold >= 1:
            raise ConfigError("panic_threshold", self.panic_threshold, "must be >= 1")
        if not self.scale_to_zero_after_s >= 0:
            raise ConfigError("scale_to_zero_after_s", self.scale_to_zero_after_s, "must be >= 0")


@dataclass(frozen=True)
class Decision:
    """A replica count and why: the means it came from and the mode."""

    replicas: int
    current: int
    stable_demand: float
    panic_demand: float
    mode: str  # "stable", "panic", "from-zero", "to-zero", "idle" (kept warm before zero)

    def __str__(self) -> str:
        return (
            f"{self.current} -> {self.replicas} engines ({self.mode}; demand "
            f"{self.stable_demand:.1f} over the stable window, {self.panic_demand:.1f} over the "
            "panic window)"
        )


class Autoscaler:
    """One deployment's autoscaler (see the module docstring).

    Args:
        cfg: settings.
        min_replicas: the least engines (0 allows scale to zero).
        max_replicas: the most engines.
        now: when it starts (an idle period counts from here).
    """

    def __init__(
        self, cfg: AutoscaleConfig, *, min_replicas: int, max_replicas: int, now: float
    ) -> None:
        if not 0 <= min_replicas <= max_replicas:
            raise ConfigError(
                "minReplicas", min_replicas, f"must be 0..maxReplicas ({max_replicas})"
            )
        self.cfg = cfg
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas
        self._samples: deque[tuple[float, float]] = deque()
        self._last_demand = now  # when demand was last above zero
        self._panic_until = -math.inf

    def observe(self, now: float, demand: float) -> None:
        """Record the deployment's demand now (in flight + queued requests)."""
        self._samples.append((now, demand))
        while self._samples and self._samples[0][0] <= now - self.cfg.stable_window_s:
            self._samples.popleft()
        if demand > 0:
            self._last_demand = now

    def _mean(self, now: float, window_s: float) -> float:
        recent = [d for t, d in self._samples if t > now - window_s]
        return sum(recent) / len(recent) if recent else 0.0

    def decide(self, now: float, current: int) -> Decision:
        """The replica count to run now, given ``current`` engines wanted so far."""
        target = self.cfg.target_per_engine
        stable = self._mean(now, self.cfg.stable_window_s)
        panic = self._mean(now, self.cfg.panic_window_s)
        want_stable = math.ceil(stable / target)
        want_panic = math.ceil(panic / target)
        latest = self._samples[-1][1] if self._samples else 0.0
        mode = "stable"
        if current and want_panic >= self.cfg.panic_threshold * current:
            self._panic_until = now + self.cfg.stable_window_s
        if current == 0 and latest > 0:
            mode, wanted = "from-zero", max(1, want_panic)
        elif now < self._panic_until:
            mode, wanted = "panic", max(current, want_panic, want_stable)
        else:
            wanted = want_stable
        if wanted == 0 and current > 0:
            if now - self._last_demand < self.cfg.scale_to_zero_after_s:
                mode, wanted = "idle", 1
            else:
                mode = "to-zero"
        replicas = max(self.min_replicas, min(self.max_replicas, wanted))
        return Decision(replicas, current, round(stable, 3), round(panic, 3), mode)


__all__ = ["AutoscaleConfig", "Autoscaler", "Decision"]
