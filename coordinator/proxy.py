"""Forward a validated request to an engine and pass its answer back, streaming unbuffered.

The engine is chosen by the scheduling pipeline (:mod:`.router`): the prompt is tokenized the
way the engine will see it (only when the profile has a prefix scorer), then filtered, scored and
picked, among the engines whose circuit breakers let them through (:mod:`.enginehealth`). The
client's body bytes go to the engine unchanged. Which engine a request tries, whether it retries
(after a connection error, a timeout or a 5xx before the response started; on another engine,
another node when one is left, after a jittered backoff, within its tries and the retry budget;
a refused connection at once and for free), and when it gives up, are decided by its
:class:`.AttemptPlan` (:mod:`.attempts`, sans-I/O); this module only does what the plan says.
``x-request-timeout`` (seconds, or the configured default) bounds the wait for a response to
start (504 past it) and is passed on to the engine with what is left of it. Once a response has
started, its bytes go to the client as they arrive; a broken stream is continued elsewhere
(:mod:`.streamrelay`). Every routed response carries ``x-request-id``, ``x-selected-pod`` (the
engine id), ``x-cache-prefix-length`` (prompt tokens the engine holds in its prefix cache, per
the KV index) and ``x-scheduling-time-ms`` (filter + score + pick; tokenizing is not included).
A request the decision splits is prefilled on a prefill engine first (:mod:`.pdsplit`;
``x-prefill-pod`` names it); ``x-prefiller-host-port`` and a client's ``kv_transfer_params`` are
checked by :mod:`.prefiller`.
"""

from __future__ import annotations

import logging
import math
import random
import time
import uuid
from collections.abc import Callable, Sequence

import trio

from . import gatewayspans, healthwatch, tracing
from .admission import Admission, Overloaded, WaitEstimate, priority_of
from .attempts import CONNECTED, AttemptPolicy, GiveUp, Wait
from .enginecalls import EngineCalls
from .enginehealth import EngineHealth
from .errors import ModelNotFound, NoCapacity
from .forwarded import TIMEOUT_HEADER, Forwarded, holding, is_sse, relay
from .metrics import CoordinatorMetrics
from .pdsplit import PDConfig, PrefillRunner, Splitter
from .picker import InflightCounter
from .pools import EnginePools
from .prefiller import Forbidden, check_body, prefiller_of
from .registry import EngineView, FleetRegistry
from .requestheaders import FORWARD_HEADERS, decision_headers, timeout_of, upstream_headers
from .resilience import ResilienceConfig, RetryBudget
from .router.prompt import PromptTokenizer, RoutingRequest
from .router.scheduler import Decision, Scheduler
from .sharedlimits import SharedLimits
from .streamrelay import StreamRelay
from .validation import ParsedRequest
from .versions import session_key

log = logging.getLogger(__name__)


class Gateway:
    """Routes requests to engines and proxies the answers.

    Owns the engines' health (:class:`.EngineHealth`: breakers, progress, probes, incarnations),
    the retry budget, the in-flight counts and admission. :meth:`watch_silent` is its one
    long-lived task (the owner runs it in its nursery); cancelling it stops the probes.

    Args:
        pools: the clients of each engine (owned by the coordinator service).
        registry: where routable engines come from.
        metrics: where counts go.
        scheduler: the scheduling pipeline.
        tokenizer: tokenizes prompts for prefix matching.
        resilience: breaker, retry and budget settings.
        admission: per-model slots and priority queues (default: ``slots_per_engine`` slots
            per engine, ``max_queue`` waiting).
        slots_per_engine: requests in flight per engine before requests queue.
        max_queue: waiters per model before new requests are shed.
        limits: counts waiters against the fleet-wide ``max_queue`` (default: this
            coordinator's queue alone).
        is_deployed: whether a model is deployed (its requests wait for engines to start).
        engines_for: ``(model, session)`` → the engines that may serve it (default: the
            registry's routable engines of the model).
        max_queue_wait_s: longest wait for a slot when the request has no deadline.
        pd: how long a split request's prefill may take (:mod:`.pdsplit`).
        rng: draws retry backoffs.
        clock: times tokenizing and engine calls.
    """

    def __init__(
        self,
        pools: EnginePools,
        registry: FleetRegistry,
        metrics: CoordinatorMetrics,
        *,
        scheduler: Scheduler,
        tokenizer: PromptTokenizer,
        resilience: ResilienceConfig | None = None,
        admission: Admission | None = None,
        slots_per_engine: int = 64,
        max_queue: int = 500,
        limits: SharedLimits | None = None,
        is_deployed: Callable[[str], bool] = lambda model: False,
        engines_for: Callable[[str, str | None], list[EngineView]] | None = None,
        max_queue_wait_s: float = 30.0,
        pd: PDConfig | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.pools = pools
        self.registry = registry
        self.metrics = metrics
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.inflight = InflightCounter()
        streaming = InflightCounter()  # streamed requests in flight (the stall rule's)
        self.resilience = resilience or ResilienceConfig()
        self.health = EngineHealth(self.resilience, self.inflight.get, streaming.get)
        self.breakers = self.health.breakers
        self.budget = RetryBudget(self.resilience)
        self.calls = EngineCalls(pools, metrics, self.health, self.inflight, streaming, clock)
        # A relayed stream's reads are timed by the relay alone: its idle limit, or the read
        # timeout where that is shorter.
        idle_s = min(self.resilience.stream_idle_s, pools.timeouts.read_s)
        self.streams = StreamRelay(self.calls, tokenizer, metrics, idle_s)
        # (served name, session key or None) -> the engines that may serve it (versions)
        self.engines_for = engines_for or (lambda model, session: self.registry.routable(model))
        self.admission = admission or Admission(
            lambda m: len(self.engines_for(m, None)),
            slots_per_engine=slots_per_engine,
            max_queue=max_queue,
            on_change=lambda model, n: self.metrics.queued.labels(model=model).set(n),
            limits=limits,
            held_elsewhere=self._held_off_routing,
        )
        self.is_deployed = is_deployed
        self.max_queue_wait_s = max_queue_wait_s
        self.rng = rng or random.Random()
        self.clock = clock
        self.policy = AttemptPolicy(
            self.resilience,
            self.health,
            self.budget,
            self.rng,
            self._schedule,
            lambda model, session: self.engines_for(model, session),
        )
        runner = PrefillRunner(pools, self.calls.watching, self.calls.hold)
        self.splitter = Splitter(pd or PDConfig(), runner, metrics, self._prefill_failed)

    async def forward(
        self,
        path: str,
        request: ParsedRequest,
        raw: bytes,
        headers: dict[str, str],
        *,
        tier: int | None = None,
    ) -> Forwarded:
        """Admit ``request`` (a slot of its model, maybe after queueing), pick an engine for
        it and open its response. The slot is held until the response's body is done.
        ``tier`` (an API key's priority class) bounds how urgent ``x-priority`` may make it.

        Raises:
            InvalidRequest: a bad ``x-priority`` or ``x-request-timeout``.
            ModelNotFound: no engine serves the model, and it is not deployed.
            Overloaded: shed from a full queue, or no engine in time (503).
            NoCapacity: engines exist but none answered (503).
            DeadlineExceeded: no response started before the deadline (504).
        """
        priority = priority_of(headers, tier)
        timeout_s = timeout_of(headers, self.resilience.request_timeout_s)
        start = trio.current_time()
        deadline = start + timeout_s if timeout_s is not None else math.inf
        if not self.is_deployed(request.model) and not any(
            e.model == request.model for e in self.registry.engines()
        ):
            raise ModelNotFound(request.model)
        try:
            check_body(request.body)
            prefiller = prefiller_of(headers, request.model, self.registry.engines())
        except Forbidden as exc:
            self.metrics.ssrf_blocked.labels(reason=exc.reason).inc()
            raise
        # A request's own deadline bounds its wait (a deployment scaling from zero may take
        # minutes to start an engine); without one, max_queue_wait_s does.
        wait_until = deadline if math.isfinite(deadline) else start + self.max_queue_wait_s
        slot = self.admission.admit(request.model, priority, wait_until)
        try:
            with tracing.span("fleet.admission", {"fleet.priority": priority}) as span:
                queued = await slot.__aenter__()  # given back once the body is done, or below
                if span.is_recording():
                    span.set_attributes(
                        {"fleet.queued": queued, "fleet.queue_wait_s": trio.current_time() - start}
                    )
        except Overloaded:
            self.metrics.shed.labels(model=request.model).inc()
            raise
        wait = self.calls.first_byte.get((request.model, request.stream)) or WaitEstimate()
        expected = wait.mean_s or 0.0
        if queued and not wait.allows(deadline - trio.current_time()):
            # Its response would start after its deadline (it waited in the queue): the
            # engine's time is better spent on a request that can still make it.
            await slot.__aexit__(None, None, None)
            self.metrics.shed.labels(model=request.model).inc()
            raise Overloaded(
                f"The queue for `{request.model}` is too long for this request's deadline "
                f"(a response now starts after about {expected:.1f} s); retry shortly.",
                retry_after_s=max(1, math.ceil(expected)),
            )
        try:
            forwarded = await self._forward(
                path, request, raw, headers, timeout_s, deadline, prefiller
            )
        except BaseException:
            await slot.__aexit__(None, None, None)
            raise
        return holding(forwarded, lambda: slot.__aexit__(None, None, None))

    async def _forward(
        self,
        path: str,
        request: ParsedRequest,
        raw: bytes,
        headers: dict[str, str],
        timeout_s: float | None,
        deadline: float,
        prefiller: EngineView | None = None,
    ) -> Forwarded:
        """Try engines as the request's plan says; the response to pass on."""
        request_id = headers.get("x-request-id") or f"fleet-{uuid.uuid4().hex}"
        session = session_key(headers, request_id)
        candidates = self.engines_for(request.model, session)
        if not candidates:
            raise NoCapacity(
                f"The model `{request.model}` has no ready engine right now "
                "(starting or restarting); retry shortly.",
                retry_after_s=5,
            )
        upstream = upstream_headers(headers, request_id)
        routing = await self.routing_request(request, headers)
        now = trio.current_time()
        plan = self.policy.plan(
            request.model,
            routing,
            candidates,
            now=now,
            deadline=deadline,
            timeout_s=timeout_s,
            session=session,
        )
        split = None  # the prefill/decode split, decided (and prefilled) on the first try
        answer: Forwarded | None = None  # the last engine's 5xx, passed on if nothing is left
        while True:
            step = plan.next(trio.current_time())
            if answer is not None and not (isinstance(step, GiveUp) and step.error is None):
                await answer.discard()
                answer = None
            if isinstance(step, Wait):
                await trio.sleep(step.seconds)
                continue
            if isinstance(step, GiveUp):
                if step.why == "budget":
                    self.metrics.retry_budget_exhausted.inc()
                if step.error is not None:
                    raise step.error
                assert answer is not None
                return answer
            if step.retry:
                self.metrics.retries.labels(reason=step.retry).inc()
            decision, engine = step.decision, step.engine
            attributes: dict[str, str | int] | None = None
            if tracing.enabled():
                attributes = {"fleet.engine.id": engine.id, "fleet.attempt.retry": plan.retries}
            with tracing.span("fleet.attempt", attributes) as span:
                if split is None:
                    split = await self.splitter.split(
                        path,
                        request.body,
                        raw,
                        decision,
                        prefiller,
                        upstream,
                        plan.deadline,
                    )
                if timeout_s is not None:
                    left = max(plan.deadline - trio.current_time(), 0.001)
                    upstream[TIMEOUT_HEADER] = f"{left:.3f}"
                outcome, forwarded = await self.calls.attempt(
                    engine,
                    path,
                    split.body,
                    upstream,
                    request,
                    request_id,
                    plan.deadline,
                )
                if span.is_recording():
                    gatewayspans.attempt_attributes(span, outcome, forwarded)
            now = trio.current_time()
            plan.record(outcome, now)
            if forwarded is None:
                self.metrics.upstream_errors.labels(engine=engine.id).inc()
                continue
            decision_headers(forwarded.headers, decision, split.prefill)
            if outcome is not CONNECTED:  # a 5xx: passed on if no other engine gets a try
                self.metrics.upstream_errors.labels(engine=engine.id).inc()
                answer = forwarded
                continue
            self.scheduler.served(routing, engine.id, now)
            if request.stream and forwarded.status == 200 and is_sse(forwarded):
                forwarded.body = self.streams.relay(
                    plan,
                    engine,
                    forwarded.timed_body(),
                    forwarded.ready,
                    forwarded.abort,
                    path,
                    request,
                    upstream,
                )
            return forwarded

    def _schedule(
        self, routing: RoutingRequest, candidates: Sequence[EngineView], now: float
    ) -> Decision:
        """The scheduling pipeline's decision among ``candidates`` (the plans' ``pick``)."""
        with tracing.span("fleet.schedule") as span:
            decision = self.scheduler.schedule(routing, candidates, self.inflight.get, now)
            if span.is_recording():  # not built when tracing is off
                span.set_attributes(gatewayspans.decision_attributes(decision))
        return decision

    def engine_down(self, engine_id: str, why: str, *, refused: bool = False) -> None:
        """The engine is dead or hung: eject it (its breaker opens) and end every wait on it,
        so requests not answered yet are retried elsewhere and started streams resumed.
        ``refused``: it refused a connection, so it is dead, not merely suspect."""
        self.health.down(engine_id, trio.current_time(), why, refused=refused)

    def forget(self, keep: Sequence[str]) -> None:
        """Drop per-engine state of engines that left (``keep``: the known ones)."""
        alive = set(keep)
        self.health.forget(alive)
        self.calls.forget(alive)

    async def watch_silent(self) -> None:
        """Probe and sweep the engines' health until cancelled (:func:`.healthwatch.watch`)."""
        await healthwatch.watch(self.health, self.registry, self.metrics, self.resilience)

    async def routing_request(
        self, request: ParsedRequest, headers: dict[str, str]
    ) -> RoutingRequest:
        """What the pipeline needs of a request: its prompt's tokens when a scorer uses them."""
        routing = RoutingRequest(request.model, headers=headers)
        if self.scheduler.needs_tokens:  # a prefix scorer, or a P/D decider
            started = self.clock()
            routing.token_ids = await self.tokenizer.tokens(
                request.model, request.kind, request.body
            )
            routing.tokenize_ms = (self.clock() - started) * 1000
        return routing

    def _held_off_routing(self, model: str) -> int:
        """``model``'s requests in flight on engines that no longer take traffic (draining
        or down): admission counts them apart from the routable engines' slots."""
        by_engine = self.calls.by_model.get(model)
        if by_engine is None:
            return 0
        held = 0
        for engine_id, n in by_engine.counts().items():
            view = self.registry.engine(engine_id)
            if view is None or not view.routable:
                held += n
        return held

    def _prefill_failed(self, engine_id: str, reason: str) -> None:
        """A split's prefill engine failed (:data:`.pdsplit.FALLBACK_REASONS`): eject it when
        it refused the connection; count an error or a 5xx against its breaker (a slow one is
        not: under overload every engine is slow; a hung one fails its health probe)."""
        if reason == "refused":
            self.engine_down(engine_id, "connection refused", refused=True)
        elif reason in ("error", "status", "bad_answer"):
            self.breakers.get(engine_id).failure(trio.current_time())
        self.metrics.upstream_errors.labels(engine=engine_id).inc()


__all__ = ["FORWARD_HEADERS", "Forwarded", "Gateway", "relay"]
