"""Attempt planning: which engine a request tries next, how long it waits first, when it gives
up. Sans-I/O: every decision takes ``now`` and returns a step; the I/O layer (:mod:`.proxy`,
:mod:`.streamrelay`) opens responses, sleeps and reports what happened::

    plan = policy.plan(model, routing, candidates, now=now, deadline=deadline, timeout_s=...)
    while True:
        step = plan.next(trio.current_time())
        if isinstance(step, Wait):   sleep step.seconds
        elif isinstance(step, GiveUp): raise step.error (None: pass the engine's own answer on)
        else:                          open on step.engine; plan.record(outcome, now)

One plan serves a request from its first try to the last resume of its stream.

First tries. The candidates are the model's engines that their breakers let through (none: 503
"refused connections"). Each try goes to an engine not tried yet, on a node that has not failed
this request when one is left, as the scheduler picks (nothing passes its filters on the first
try: 503). Outcomes:

- :class:`Connected` (a response below 500 started): done; the breaker counts a success.
- :class:`Refused` (nothing listens: the engine is gone): the engine is put down at once and the
  retry is immediate and free: no try, no budget, no backoff (no engine got the request).
- :class:`Failed` (a connect error, a read timeout, a failed health probe, a 5xx): a try and a
  breaker failure. Retried while fewer than ``max_attempts`` tries were made, an engine is left
  and the retry budget has a retry, after a full-jitter backoff that must end before the
  deadline (504 otherwise). No retry: a 5xx goes to the client as the engine sent it
  (``GiveUp(None)``); an error gives 503 naming the last one.
- :class:`PastDeadline`: 504, and no breaker failure (under overload every engine is slow; a
  hung one is found by its health probe).

Resumes. A connected stream that breaks (:class:`Broken`: an error, an end without ``[DONE]``,
silence) counts a breaker failure on its engine, and the plan looks for an engine to continue
it: one its breaker lets through that no continuation of this stream was tried on, picked among
the model's engines as they are now; at most ``max_resumes`` continuations, only before the
deadline, and with neither budget nor backoff (the client is waiting mid-answer). A
continuation answered below 500 but not as a stream ends it (the engine refused the request).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

from .attemptsteps import (
    CONNECTED,
    PAST_DEADLINE,
    Broken,
    Connected,
    Failed,
    GiveUp,
    Outcome,
    PastDeadline,
    Refused,
    Step,
    Try,
    Wait,
)
from .enginehealth import EngineHealth
from .errors import ApiError, DeadlineExceeded, NoCapacity
from .registry import EngineView
from .resilience import ResilienceConfig, RetryBudget, backoff_s
from .router.prompt import RoutingRequest
from .router.scheduler import Decision

Pick = Callable[[RoutingRequest, Sequence[EngineView], float], Decision]
EnginesFor = Callable[[str, str | None], Sequence[EngineView]]

_TRYING, _CONNECTED, _RESUMING, _ENDED = range(4)


class AttemptPolicy:
    """What every request's plan shares.

    Args:
        cfg: tries, backoff, deadline and resume settings.
        health: the engines' breakers (one owner of engine health).
        budget: the retry budget.
        rng: draws the backoff's jitter.
        pick: the scheduler: ``(request, candidates, now)`` → its decision.
        engines_for: ``(model, session)`` → the engines that may serve it now (resumes ask
            again each time).
    """

    def __init__(
        self,
        cfg: ResilienceConfig,
        health: EngineHealth,
        budget: RetryBudget,
        rng: random.Random,
        pick: Pick,
        engines_for: EnginesFor,
    ) -> None:
        self.cfg = cfg
        self.health = health
        self.budget = budget
        self.rng = rng
        self.pick = pick
        self.engines_for = engines_for

    def plan(
        self,
        model: str,
        routing: RoutingRequest,
        candidates: Sequence[EngineView],
        *,
        now: float,
        deadline: float,
        timeout_s: float | None,
        session: str | None = None,
    ) -> AttemptPlan:
        """The plan of one request for ``model`` among ``candidates`` (its engines, before
        breakers), from ``now``. ``deadline``: when its response must have started (``math.inf``
        without one), ``timeout_s`` after it arrived (None: no deadline; the 504 names it).
        ``session``: its session key (a continuation's engines are the session's). The
        request counts toward the retry budget.

        Raises:
            ValueError: a finite ``deadline`` without ``timeout_s``, or the reverse.
        """
        if math.isfinite(deadline) != (timeout_s is not None):
            raise ValueError(f"deadline {deadline} and timeout_s {timeout_s} disagree")
        self.budget.request(now)
        return AttemptPlan(self, model, routing, candidates, now, deadline, timeout_s, session)


class AttemptPlan:
    """One request's tries and resumes; see the module docstring for the rules.

    Call :meth:`next` for a step; after a :class:`Try`, :meth:`record` its outcome (and, for a
    stream, later :class:`Broken` if it breaks); after a :class:`Wait`, call :meth:`next`
    again. A :class:`GiveUp` is final: :meth:`next` returns it again.
    """

    __slots__ = (
        "_attempt",
        "_engine",
        "_failed_nodes",
        "_last_error",
        "_mode",
        "_pending",
        "_policy",
        "_retry",
        "_tried",
        "candidates",
        "deadline",
        "model",
        "resumes",
        "routing",
        "session",
        "timeout_s",
    )

    def __init__(
        self,
        policy: AttemptPolicy,
        model: str,
        routing: RoutingRequest,
        candidates: Sequence[EngineView],
        now: float,
        deadline: float,
        timeout_s: float | None,
        session: str | None,
    ) -> None:
        self._policy = policy
        self.model = model
        self.routing = routing
        self.session = session
        self.timeout_s = timeout_s
        self.deadline = deadline
        self.candidates = policy.health.routable(candidates, now)
        self.resumes = 0  # continuations that started
        self._tried: list[str] = []
        self._failed_nodes: set[str] = set()
        self._attempt = 0  # tries that reached an engine; a refused connect is not one
        self._engine: EngineView | None = None
        self._last_error = "no engine was tried"
        self._retry = ""
        self._mode = _TRYING
        self._pending: Wait | GiveUp | None = None
        if not self.candidates:
            self._end(
                NoCapacity(
                    f"Every engine of `{model}` refused connections just now (their "
                    "processes or nodes are gone); retry shortly.",
                    retry_after_s=1,
                ),
                "no_engine",
            )

    @property
    def engine(self) -> EngineView | None:
        """The engine of the last :class:`Try`."""
        return self._engine

    @property
    def retries(self) -> int:
        """Tries before the current one (first tries, or continuations once resuming)."""
        return max(len(self._tried) - 1, 0)

    def next(self, now: float) -> Step:
        """What to do now."""
        pending = self._pending
        if pending is not None:
            if isinstance(pending, Wait):
                self._pending = None
            return pending
        if self._mode == _TRYING:
            return self._next_try(now)
        if self._mode == _RESUMING:
            return self._next_resume(now)
        raise RuntimeError("nothing to plan: the request is connected or ended")

    def record(self, outcome: Outcome, now: float) -> None:
        """What happened to the last :class:`Try` (or, :class:`Broken`, to its stream).

        Raises:
            RuntimeError: no try is outstanding (or, for :class:`Broken`, none connected).
        """
        engine = self._engine
        if engine is None or self._mode == _ENDED or self._pending is not None:
            raise RuntimeError("no try to record an outcome of")
        breaker = self._policy.health.breaker(engine.id)
        if isinstance(outcome, Broken):
            if self._mode != _CONNECTED:
                raise RuntimeError("only a connected stream can break")
            breaker.failure(now)
            self._mode = _RESUMING
            return
        if self._mode == _CONNECTED:
            raise RuntimeError("the request is connected: only Broken can follow")
        if isinstance(outcome, Connected):
            breaker.success(now)
            if self._mode == _RESUMING:
                self.resumes += 1
            else:  # continuations avoid the engines of this stream only
                self._tried.clear()
                self._tried.append(engine.id)
            self._mode = _CONNECTED
        elif self._mode == _TRYING:
            self._tried_failed(engine, outcome, now)
        else:
            self._resume_failed(engine, outcome, now)

    # -- first tries ---------------------------------------------------------------------------

    def _next_try(self, now: float) -> Step:
        if now >= self.deadline:
            return self._past_deadline()
        tried, candidates = self._tried, self.candidates
        if tried:
            left = [c for c in candidates if c.id not in tried]
            if not left:
                return self._no_answer()
            # A retry goes to another node when one is left: engines of one node fail together
            # (its agent, its network, its host), and a dead node's other engines would each
            # take a try of this request.
            elsewhere = [c for c in left if c.node not in self._failed_nodes]
            decision = self._policy.pick(self.routing, elsewhere or left, now)
        else:
            decision = self._policy.pick(self.routing, candidates, now)
        engine = decision.engine
        if engine is None:
            if not tried:
                return self._end(
                    NoCapacity(
                        f"No engine for `{self.model}` passes the scheduling filters.",
                        retry_after_s=5,
                    ),
                    "filtered",
                )
            return self._no_answer()
        return self._try(engine, decision, now)

    def _tried_failed(self, engine: EngineView, outcome: Outcome, now: float) -> None:
        policy, cfg = self._policy, self._policy.cfg
        if isinstance(outcome, PastDeadline):
            self._past_deadline()
            return
        self._failed_nodes.add(engine.node)
        if isinstance(outcome, Refused):
            # The process is gone (killed, or its node died): eject it now, so the requests
            # behind this one do not each find that out.
            policy.health.down(engine.id, now, "connection refused", refused=True)
            self._last_error, reason, free = outcome.detail, "refused", True
        else:
            assert isinstance(outcome, Failed)
            self._attempt += 1
            policy.health.breaker(engine.id).failure(now)
            self._last_error, reason, free = outcome.detail, outcome.reason, False
            if not outcome.retryable:
                self._stop(outcome, "refused")
                return
        if self._attempt >= cfg.max_attempts:
            self._stop(outcome, "attempts")
            return
        if all(c.id in self._tried for c in self.candidates):
            self._stop(outcome, "no_engine")
            return
        if not free and not policy.budget.try_retry(now):
            self._stop(outcome, "budget")
            return
        self._retry = reason
        if not free:
            pause = backoff_s(cfg, self._attempt, policy.rng)
            if now + pause >= self.deadline:
                self._past_deadline()
            elif pause > 0:
                self._pending = Wait(pause)

    def _stop(self, outcome: Outcome, why: str) -> None:
        """No retry: the engine's own answer goes to the client, or a 503 naming the error."""
        if isinstance(outcome, Failed) and outcome.status is not None:
            self._end(None, why)
        else:
            self._end(self._no_answer_error(), why)

    def _no_answer(self) -> GiveUp:
        return self._end(self._no_answer_error(), "no_engine")

    def _no_answer_error(self) -> NoCapacity:
        return NoCapacity(
            f"No engine for `{self.model}` answered ({self._last_error}); retry shortly.",
            retry_after_s=1,
        )

    def _past_deadline(self) -> GiveUp:
        assert self.timeout_s is not None  # an infinite deadline never passes
        return self._end(DeadlineExceeded(self.timeout_s), "deadline")

    # -- resumes -------------------------------------------------------------------------------

    def _next_resume(self, now: float) -> Step:
        policy = self._policy
        if self.resumes >= policy.cfg.max_resumes:
            return self._end(
                NoCapacity("The engines serving this stream failed; retry the request."),
                "exhausted",
            )
        tried = self._tried
        found = [c for c in policy.engines_for(self.model, self.session) if c.id not in tried]
        candidates = policy.health.routable(found, now)
        if not candidates or now >= self.deadline:
            return self._end(
                NoCapacity(
                    "The engine serving this stream failed and no other engine could "
                    "continue it; retry the request."
                ),
                "no_engine",
            )
        decision = policy.pick(self.routing, candidates, now)
        if decision.engine is None:
            return self._end(
                NoCapacity("No engine can continue this stream; retry the request."),
                "no_engine",
            )
        return self._try(decision.engine, decision, now)

    def _resume_failed(self, engine: EngineView, outcome: Outcome, now: float) -> None:
        health = self._policy.health
        if isinstance(outcome, Failed) and not outcome.retryable:
            self._end(
                NoCapacity(
                    "The engine serving this stream failed and the continuation was refused "
                    f"({outcome.status})."
                ),
                "refused",
            )
            return
        if isinstance(outcome, Refused):
            health.down(engine.id, now, "connection refused", refused=True)
        if not isinstance(outcome, PastDeadline):  # the next step sees the deadline passed
            health.breaker(engine.id).failure(now)

    # -- both ----------------------------------------------------------------------------------

    def _try(self, engine: EngineView, decision: Decision, now: float) -> Try:
        self._tried.append(engine.id)
        self._engine = engine
        self._policy.health.breaker(engine.id).allow(now)  # counts a half-open probe
        retry, self._retry = self._retry, ""
        return Try(decision, retry)

    def _end(self, error: ApiError | None, why: str) -> GiveUp:
        step = GiveUp(error, why)
        self._pending = step
        self._mode = _ENDED
        return step


__all__ = [
    "CONNECTED",
    "PAST_DEADLINE",
    "AttemptPlan",
    "AttemptPolicy",
    "Broken",
    "Connected",
    "Failed",
    "GiveUp",
    "Outcome",
    "PastDeadline",
    "Refused",
    "Step",
    "Try",
    "Wait",
]
