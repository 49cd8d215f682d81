"""Circuit breakers per engine, outlier-ejection cap, retry budget and backoff. Sans-I/O.

Breaker (per engine)::

    closed ──(5 consecutive failures, or 5 failures within 10 s)──▶ open
    open ──(60 s; 10 s once an active health check passed)──▶ half-open
    half-open ──(a probe succeeds)──▶ closed        half-open ──(a probe fails)──▶ open

In half-open, at most ``half_open_probes`` requests are in flight to the engine at once. Ejection
is capped: breakers never take more than ``max_ejected_share`` of a model's engines out of
routing (default 50%); past the cap the engines whose breakers opened most recently stay in. An
engine that refused a connection (nothing listens: its process or node is gone) is not an outlier
but dead: until its open period ends it is out of routing and out of the cap's count, so the cap
never lets a dead engine back in while a merely suspect one waits.

Retries go to a different engine, after ``base_backoff_s × 2^attempt`` with full jitter, up to
``max_attempts`` tries in all, and only while the retry budget allows: retries in the last
``budget_window_s`` stay under ``budget_ratio`` × requests + ``budget_min_per_s`` ×
``budget_window_s`` (10% plus 1 per second, as Finagle's budget), so a sick fleet is not stormed
with retries.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from fleet.protocol.errors import ConfigError

BreakerState = Literal["closed", "open", "half_open"]
STATE_VALUES: dict[BreakerState, int] = {"closed": 0, "half_open": 1, "open": 2}


@dataclass(frozen=True)
class ResilienceConfig:
    """Breaker, ejection and retry settings (the issue's defaults).

    Raises:
        ConfigError: a value out of range.
    """

    consecutive_failures: int = 5
    window_failures: int = 5
    window_s: float = 10.0
    open_s: float = 60.0
    open_after_health_ok_s: float = 10.0
    half_open_probes: int = 1
    max_ejected_share: float = 0.5
    max_attempts: int = 3
    base_backoff_s: float = 0.1
    backoff_factor: float = 2.0
    budget_ratio: float = 0.1
    budget_min_per_s: float = 1.0
    budget_window_s: float = 10.0
    request_timeout_s: float | None = None  # default deadline; ``x-request-timeout`` overrides
    stall_s: float = 30.0  # requests in flight but no byte from the engine for this long
    stream_idle_s: float = 30.0  # a started stream silent this long is resumed elsewhere
    probe_after_s: float = 1.0  # an engine with requests in flight silent this long is probed
    probe_timeout_s: float = 2.0  # ...and is down if its /health does not answer 200 in time
    max_resumes: int = 2  # continuations of one stream on other engines

    def __post_init__(self) -> None:
        for key in ("consecutive_failures", "window_failures", "half_open_probes", "max_attempts"):
            if getattr(self, key) < 1:
                raise ConfigError(key, getattr(self, key), "must be >= 1")
        if self.max_resumes < 0:
            raise ConfigError("max_resumes", self.max_resumes, "must be >= 0")
        for key in (
            "window_s",
            "open_s",
            "budget_window_s",
            "stall_s",
            "stream_idle_s",
            "probe_after_s",
            "probe_timeout_s",
        ):
            if not getattr(self, key) > 0:
                raise ConfigError(key, getattr(self, key), "must be > 0")
        if not 0 <= self.max_ejected_share <= 1:
            raise ConfigError("max_ejected_share", self.max_ejected_share, "must be in [0, 1]")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ConfigError("request_timeout_s", self.request_timeout_s, "must be > 0")
        if self.budget_min_per_s < 0:
            raise ConfigError("budget_min_per_s", self.budget_min_per_s, "must be >= 0")
        if self.base_backoff_s < 0 or self.backoff_factor < 1 or self.budget_ratio < 0:
            raise ConfigError("backoff", self.base_backoff_s, "base >= 0, factor >= 1, ratio >= 0")


@dataclass
class Breaker:
    """One engine's circuit breaker."""

    cfg: ResilienceConfig
    state: BreakerState = "closed"
    consecutive: int = 0
    failures: deque[float] = field(default_factory=deque)
    opened_at: float = 0.0
    open_until: float = 0.0
    probes: int = 0
    transitions: int = 0
    dead: bool = False  # opened by a refused connection; cleared by a success

    def allow(self, now: float) -> bool:
        """May a request go to this engine now? (Counts a half-open probe when it may.)"""
        if self.state == "open":
            if now < self.open_until:
                return False
            self._to("half_open")
            self.probes = 0
        if self.state == "half_open":
            if self.probes >= self.cfg.half_open_probes:
                return False
            self.probes += 1
        return True

    def routable(self, now: float) -> bool:
        """Would :meth:`allow` say yes (without counting a probe)?"""
        if self.state == "open":
            return now >= self.open_until
        if self.state == "half_open":
            return self.probes < self.cfg.half_open_probes
        return True

    def success(self, now: float) -> None:
        self.consecutive = 0
        self.dead = False
        if self.state == "half_open":
            self.failures.clear()
            self._to("closed")
        self.probes = max(0, self.probes - 1)

    def failure(self, now: float) -> None:
        self.consecutive += 1
        self.failures.append(now)
        while self.failures and now - self.failures[0] > self.cfg.window_s:
            self.failures.popleft()
        if self.state == "half_open":
            self._open(now)
        elif self.state == "closed" and (
            self.consecutive >= self.cfg.consecutive_failures
            or len(self.failures) >= self.cfg.window_failures
        ):
            self._open(now)

    def trip(self, now: float) -> None:
        """Open now, whatever the state (a stalled engine)."""
        self._open(now)

    def refused(self, now: float) -> None:
        """Open now and mark the engine dead: it refused a connection."""
        self.dead = True
        self._open(now)

    def health_ok(self, now: float) -> None:
        """An active health check passed: an open breaker tries again sooner."""
        if self.state == "open":
            self.open_until = min(self.open_until, now + self.cfg.open_after_health_ok_s)

    def _open(self, now: float) -> None:
        self._to("open")
        self.opened_at = now
        self.open_until = now + self.cfg.open_s
        self.probes = 0

    def _to(self, state: BreakerState) -> None:
        if state != self.state:
            self.state = state
            self.transitions += 1


E = TypeVar("E")


class Breakers:
    """The breakers of every engine, and the ejection cap."""

    def __init__(self, cfg: ResilienceConfig | None = None) -> None:
        self.cfg = cfg or ResilienceConfig()
        self._breakers: dict[str, Breaker] = {}

    def get(self, engine_id: str) -> Breaker:
        breaker = self._breakers.get(engine_id)
        if breaker is None:
            breaker = self._breakers[engine_id] = Breaker(self.cfg)
        return breaker

    def health_ok(self, engine_id: str, now: float) -> None:
        """The engine passed an active health check (agent-side ``/health``)."""
        breaker = self._breakers.get(engine_id)
        if breaker is not None:
            breaker.health_ok(now)

    def states(self) -> dict[str, BreakerState]:
        return {e: b.state for e, b in self._breakers.items()}

    def reset(self, engine_id: str) -> None:
        """A new process serves under this id: its breaker starts closed."""
        self._breakers.pop(engine_id, None)

    def forget(self, keep: Sequence[str]) -> None:
        alive = set(keep)
        for engine_id in [e for e in self._breakers if e not in alive]:
            del self._breakers[engine_id]

    def routable(self, engines: Sequence[E], ids: Sequence[str], now: float) -> list[E]:
        """The engines breakers let through, never ejecting more than the cap allows.

        ``ids[i]`` is the engine id of ``engines[i]`` (engines of one model). Dead engines
        (a refused connection, open period not over) are left out first and not counted: the
        cap is a share of the engines that may still answer.
        """
        breakers = self._breakers
        for i in ids:  # the common case, every breaker closed: nothing to filter
            breaker = breakers.get(i)
            if breaker is not None and breaker.state != "closed":
                break
        else:
            return list(engines)
        pairs = [
            (e, i)
            for e, i in zip(engines, ids, strict=True)
            if not (self.get(i).dead and not self.get(i).routable(now))
        ]
        ok = [e for e, i in pairs if self.get(i).routable(now)]
        ejected = len(pairs) - len(ok)
        cap = int(len(pairs) * self.cfg.max_ejected_share)
        if ejected <= cap:
            return ok
        # Over the cap: let back in the engines whose breakers opened most recently (the
        # longest-open are the likeliest to be really down).
        out = [(e, i) for e, i in pairs if not self.get(i).routable(now)]
        out.sort(key=lambda pair: -self.get(pair[1]).opened_at)
        readmit = {i for _, i in out[: ejected - cap]}
        return [e for e, i in pairs if self.get(i).routable(now) or i in readmit]


class RetryBudget:
    """Retries allowed in the window: ``ratio`` × requests, plus ``min_per_s`` × the window."""

    def __init__(self, cfg: ResilienceConfig | None = None) -> None:
        self.cfg = cfg or ResilienceConfig()
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _trim(self, now: float) -> None:
        edge = now - self.cfg.budget_window_s
        for q in (self._requests, self._retries):
            while q and q[0] < edge:
                q.popleft()

    def request(self, now: float) -> None:
        """Count a request (retries are allowed in proportion to requests)."""
        requests, edge = self._requests, now - self.cfg.budget_window_s
        while requests and requests[0] < edge:  # kept trimmed: a fleet that never retries
            requests.popleft()  # would otherwise keep every request's time
        requests.append(now)

    def try_retry(self, now: float) -> bool:
        """Spend one retry if the budget has one."""
        self._trim(now)
        cfg = self.cfg
        allowed = (
            cfg.budget_ratio * len(self._requests) + cfg.budget_min_per_s * cfg.budget_window_s
        )
        if len(self._retries) + 1 > allowed:
            return False
        self._retries.append(now)
        return True


def backoff_s(cfg: ResilienceConfig, attempt: int, rng: random.Random) -> float:
    """Full-jitter exponential backoff before retry number ``attempt`` (1 = the first retry)."""
    return rng.uniform(0, cfg.base_backoff_s * cfg.backoff_factor ** (attempt - 1))


__all__ = [
    "STATE_VALUES",
    "Breaker",
    "BreakerState",
    "Breakers",
    "ResilienceConfig",
    "RetryBudget",
    "backoff_s",
]
