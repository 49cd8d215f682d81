"""Forward a validated request to an engine and pass its answer back, streaming unbuffered.

The engine is chosen by the scheduling pipeline (:mod:`.router`): the prompt is tokenized the
way the engine will see it (only when the profile has a prefix scorer), then filtered, scored and
picked, among the engines whose circuit breakers let them through (:mod:`.resilience`). The
client's body bytes go to the engine unchanged. A connection error, a timeout or a 5xx before the
response started counts against the engine's breaker and is retried on another engine after a
jittered backoff, on another node when one is left, while the retry budget allows (3 tries in
all by default); a refused connection (nothing listens: the engine is gone) ejects the engine and
is retried at once, free of tries and budget. The last engine's own 5xx goes to the client if no
other engine is left. ``x-request-timeout`` (seconds, or the
configured default) bounds the wait for a response to start (504 past it) and is passed on to the
engine with what is left of it. Once a response has started, its bytes go to the client as they
arrive. Every routed response carries ``x-request-id``, ``x-selected-pod`` (the engine id),
``x-cache-prefix-length`` (prompt tokens the engine holds in its prefix cache, per the KV index)
and ``x-scheduling-time-ms`` (filter + score + pick; tokenizing is not included). A request the
decision splits is prefilled on a prefill engine first (:mod:`.pdsplit`; ``x-prefill-pod`` names
it); ``x-prefiller-host-port`` and a client's ``kv_transfer_params`` are checked by
:mod:`.prefiller`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import httpx
import trio
from opentelemetry.trace import SpanKind, Status, StatusCode

from . import tracing
from .admission import Admission, Overloaded, WaitEstimate, priority_of
from .engineclient import EngineHTTPError, EngineURLError
from .errors import DeadlineExceeded, InvalidRequest, ModelNotFound, NoCapacity, UpstreamError
from .metrics import CoordinatorMetrics
from .pdsplit import PREFILL_POD_HEADER, PDConfig, PrefillRunner, Splitter
from .picker import InflightCounter
from .pools import EnginePools
from .prefiller import Forbidden, check_body, prefiller_of
from .registry import EngineView, FleetRegistry
from .resilience import Breakers, ResilienceConfig, RetryBudget, backoff_s
from .resume import (
    DONE,
    Progress,
    Rewriter,
    SseSplitter,
    closing_events,
    continuation,
    error_event,
)
from .router.prompt import PromptTokenizer, RoutingRequest
from .router.scheduler import Decision, Scheduler
from .sharedlimits import SharedLimits
from .validation import ParsedRequest
from .versions import session_key

log = logging.getLogger(__name__)

# Headers worth passing to the engine; everything else (host, cookies, auth) stays here.
FORWARD_HEADERS = ("content-type", "accept", "x-request-id", "traceparent", "tracestate")
TIMEOUT_HEADER = "x-request-timeout"  # seconds; the engine gets what is left of it
# After a stream's [DONE], the engine's chunked terminator follows at once; wait this long for it
# (so the connection is reused) before closing the connection instead.
END_WAIT_S = 0.5
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "content-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
        "date",
        "server",
    }
)


@dataclass
class Forwarded:
    """An engine's response, opened; ``body`` yields its bytes and then releases the engine."""

    status: int
    headers: dict[str, str]
    body: AsyncIterator[bytes]
    engine: EngineView
    discard: Callable[[], Awaitable[None]]  # close it unread (the engine is released)


class Gateway:
    """Routes requests to engines and proxies the answers.

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
        max_queue_wait_s: longest wait for a slot when the request has no deadline.
        pd: how long a split request's prefill may take (:mod:`.pdsplit`).
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
        # served name -> engine -> its requests in flight there (slots held off routing)
        self._by_model: dict[str, InflightCounter] = {}
        self.resilience = resilience or ResilienceConfig()
        self.breakers = Breakers(self.resilience)
        self.budget = RetryBudget(self.resilience)
        # engine -> when it last sent a byte (or was given work while idle): stall detection
        self.progress: dict[str, float] = {}
        self._waits: dict[str, set[trio.CancelScope]] = {}  # cancelled when the engine is down
        self._incarnation: dict[str, tuple[str, int]] = {}  # engine -> (url, pid) seen last
        # (model, stream) -> the wait for a response's first byte: a request whose deadline is
        # closer than its bound when it leaves the queue is shed, not sent
        self._first_byte: dict[tuple[str, bool], WaitEstimate] = {}
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
        runner = PrefillRunner(pools, self._watching, self._hold)
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
        timeout_s = self._timeout_s(headers)
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
        slot = contextlib.AsyncExitStack()
        # A request's own deadline bounds its wait (a deployment scaling from zero may take
        # minutes to start an engine); without one, max_queue_wait_s does.
        wait_until = deadline if math.isfinite(deadline) else start + self.max_queue_wait_s
        try:
            with tracing.span("fleet.admission", {"fleet.priority": priority}) as span:
                queued = await slot.enter_async_context(
                    self.admission.admit(request.model, priority, wait_until)
                )
                span.set_attributes(
                    {"fleet.queued": queued, "fleet.queue_wait_s": trio.current_time() - start}
                )
        except Overloaded:
            self.metrics.shed.labels(model=request.model).inc()
            raise
        wait = self._first_byte.get((request.model, request.stream)) or WaitEstimate()
        expected = wait.mean_s or 0.0
        if queued and not wait.allows(deadline - trio.current_time()):
            # Its response would start after its deadline (it waited in the queue): the
            # engine's time is better spent on a request that can still make it.
            await slot.aclose()
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
            await slot.aclose()
            raise
        return _holding(forwarded, slot)

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
        request_id = headers.get("x-request-id") or f"fleet-{uuid.uuid4().hex}"
        candidates = self.engines_for(request.model, session_key(headers, request_id))
        if not candidates:
            raise NoCapacity(
                f"The model `{request.model}` has no ready engine right now "
                "(starting or restarting); retry shortly.",
                retry_after_s=5,
            )
        upstream_headers = {k: v for k, v in headers.items() if k in FORWARD_HEADERS}
        upstream_headers["x-request-id"] = request_id
        upstream_headers.setdefault("content-type", "application/json")
        routing = await self.routing_request(request, headers)
        now = trio.current_time()
        self.budget.request(now)
        candidates = self.breakers.routable(candidates, [c.id for c in candidates], now)
        if not candidates:
            raise NoCapacity(
                f"Every engine of `{request.model}` refused connections just now (their "
                "processes or nodes are gone); retry shortly.",
                retry_after_s=1,
            )
        tried: list[str] = []
        failed_nodes: set[str] = set()
        attempt = 0  # tries that reached an engine; a refused connect is not one
        last_error = "no engine was tried"
        split = None  # the prefill/decode split, decided (and prefilled) on the first try
        while True:
            left = [c for c in candidates if c.id not in tried]
            if not left:
                break
            # A retry goes to another node when one is left: engines of one node fail together
            # (its agent, its network, its host), and a dead node's other engines would each
            # take a try of this request.
            elsewhere = [c for c in left if c.node not in failed_nodes]
            now = trio.current_time()
            with tracing.span("fleet.schedule") as span:
                decision = self.scheduler.schedule(
                    routing, elsewhere or left, self.inflight.get, now
                )
                span.set_attributes(_decision_attributes(decision))
            engine = decision.engine
            if engine is None:
                if not tried:
                    raise NoCapacity(
                        f"No engine for `{request.model}` passes the scheduling filters.",
                        retry_after_s=5,
                    )
                break
            tried.append(engine.id)
            retry: dict[str, str | int] = {
                "fleet.engine.id": engine.id,
                "fleet.attempt.retry": len(tried) - 1,
            }
            with tracing.span("fleet.attempt", retry) as span:
                if split is None:
                    split = await self.splitter.split(
                        path, request.body, raw, decision, prefiller, upstream_headers, deadline
                    )
                    now = trio.current_time()
                breaker = self.breakers.get(engine.id)
                breaker.allow(now)
                reason = ""
                if timeout_s is not None:
                    upstream_headers[TIMEOUT_HEADER] = f"{max(deadline - now, 0.001):.3f}"
                try:
                    with trio.move_on_at(deadline) as scope, self._watching(engine.id) as down:
                        forwarded = await self._open(
                            engine, path, split.body, upstream_headers, request, request_id
                        )
                    if down.cancelled_caught:
                        raise UpstreamError(engine.id, "stopped answering (health probe)", "down")
                    if scope.cancelled_caught:
                        # Not a breaker failure: under overload every engine is slow, and a hung
                        # one is found by its health probe (watch_silent).
                        assert timeout_s is not None
                        self.metrics.upstream_errors.labels(engine=engine.id).inc()
                        span.set_attribute("fleet.attempt.outcome", "deadline")
                        raise DeadlineExceeded(timeout_s)
                except UpstreamError as exc:
                    reason, last_error = exc.reason, str(exc)
                    span.set_attribute("fleet.attempt.outcome", reason)
                    log.warning("%s", exc)
                else:
                    ok = forwarded.status < 500
                    span.set_attributes(
                        {
                            "fleet.attempt.outcome": "ok" if ok else "5xx",
                            "http.response.status_code": forwarded.status,
                        }
                    )
                    if ok:
                        breaker.success(trio.current_time())
                        self.scheduler.served(routing, engine.id, trio.current_time())
                        _decision_headers(forwarded.headers, decision, split.prefill)
                        if request.stream and forwarded.status == 200 and _is_sse(forwarded):
                            forwarded.body = self._resuming(
                                forwarded.engine,
                                forwarded.body,
                                path,
                                request,
                                upstream_headers,
                                routing,
                                deadline,
                            )
                        return forwarded
                    reason, last_error = "5xx", f"engine {engine.id} answered {forwarded.status}"
            failed_nodes.add(engine.node)
            refused = reason == "refused"
            if refused:
                # The process is gone (killed, or its node died): eject it now, so the requests
                # behind this one do not each find that out. The request reached no engine, so
                # its retry is free: no attempt, no budget, no backoff (it adds no load).
                self.engine_down(engine.id, "connection refused", refused=True)
            else:
                attempt += 1
                breaker.failure(trio.current_time())
            self.metrics.upstream_errors.labels(engine=engine.id).inc()
            if reason == "5xx":
                # The engine's own error goes to the client unless another engine gets a try.
                if attempt >= self.resilience.max_attempts or not self._may_retry(
                    candidates, tried
                ):
                    _decision_headers(forwarded.headers, decision, split.prefill)
                    return forwarded
                await forwarded.discard()
            elif attempt >= self.resilience.max_attempts or not self._may_retry(
                candidates, tried, free=refused
            ):
                break
            self.metrics.retries.labels(reason=reason).inc()
            if not refused:
                pause = backoff_s(self.resilience, attempt, self.rng)
                if trio.current_time() + pause >= deadline:
                    assert timeout_s is not None
                    raise DeadlineExceeded(timeout_s)
                await trio.sleep(pause)
        raise NoCapacity(
            f"No engine for `{request.model}` answered ({last_error}); retry shortly.",
            retry_after_s=1,
        )

    async def _resuming(
        self,
        engine: EngineView,
        body: AsyncIterator[bytes],
        path: str,
        request: ParsedRequest,
        headers: dict[str, str],
        routing: RoutingRequest,
        deadline: float,
    ) -> AsyncIterator[bytes]:
        """Relay a started stream event by event; if its engine breaks it (an error, the end
        without ``[DONE]``, or silence for ``stream_idle_s``), continue it on another engine
        (:mod:`.resume`). The client's stream ends well formed whatever happens: with the
        answer, or with an error event and ``[DONE]``."""
        progress = Progress(request.kind)
        rewriter: Rewriter | None = None
        failed: list[str] = []
        resumes = 0
        while True:
            splitter = SseSplitter()
            sent: list[bytes] = []  # the first stream's events, parsed only if it breaks
            why = ""
            try:
                while True:
                    chunk = await self._next_chunk(engine.id, body)
                    if isinstance(chunk, str):
                        why = chunk
                        break
                    # One engine chunk, one piece for the client (one socket write).
                    outs: list[bytes] = []
                    done = False
                    for event in splitter.feed(chunk):
                        out = event if rewriter is None else rewriter.rewrite(event)
                        if rewriter is None:
                            sent.append(event)
                        if out is not None:
                            outs.append(out)
                        if event.startswith(DONE):
                            done = True
                            break
                    if outs:
                        yield outs[0] if len(outs) == 1 else b"".join(outs)
                    if done:
                        await _read_to_end(body)
                        return
            finally:
                aclose = getattr(body, "aclose", None)
                if aclose is not None:
                    with trio.CancelScope(shield=True):
                        await aclose()
            # The engine broke the stream: count it, then find the rest elsewhere.
            failed.append(engine.id)
            self.breakers.get(engine.id).failure(trio.current_time())
            self.metrics.upstream_errors.labels(engine=engine.id).inc()
            progress.absorb_events(sent)
            log.warning("engine %s broke a stream (%s); resuming it", engine.id, why)
            with tracing.span("fleet.resume", {"fleet.engine.id": engine.id}) as span:
                nxt = await self._continue(
                    path, request, headers, routing, deadline, progress, failed, resumes
                )
                span.set_attribute(
                    "fleet.resume.outcome", "ended" if isinstance(nxt, list) else nxt[0].engine.id
                )
            if isinstance(nxt, list):
                for event in nxt:
                    yield event
                return
            forwarded, rewriter = nxt
            engine, body = forwarded.engine, forwarded.body
            resumes += 1

    async def _next_chunk(self, engine_id: str, body: AsyncIterator[bytes]) -> bytes | str:
        """A stream's next chunk, or why none came: its end, no byte for ``stream_idle_s``, or
        its engine found down (:meth:`engine_down`). One cancel scope: it runs once per chunk."""
        idle_s = self.resilience.stream_idle_s
        scope = trio.CancelScope(deadline=trio.current_time() + idle_s)
        waits = self._waits.setdefault(engine_id, set())
        waits.add(scope)
        try:
            with scope:
                return await body.__anext__()
        except StopAsyncIteration:
            return "the stream ended without [DONE]"
        finally:
            waits.discard(scope)
        if trio.current_time() >= scope.deadline:
            return f"no byte for {idle_s:g} s"
        return "the engine stopped answering its health probe"

    async def _continue(
        self,
        path: str,
        request: ParsedRequest,
        headers: dict[str, str],
        routing: RoutingRequest,
        deadline: float,
        progress: Progress,
        failed: list[str],
        resumes: int,
    ) -> tuple[Forwarded, Rewriter] | list[bytes]:
        """Open the continuation of a broken stream on an engine not tried yet: the opened
        response with its rewriter, or the events that end the client's stream."""
        model = request.model
        tokenizer = await self.tokenizer.tokenizer(model)
        generated = (
            len(tokenizer.encode(progress.text, add_special_tokens=False))
            if tokenizer is not None and progress.text
            else progress.chunks
        )
        if routing.token_ids is None and tokenizer is not None:
            routing.token_ids = await self.tokenizer.tokens(model, request.kind, request.body)
        prompt_tokens = len(routing.token_ids) if routing.token_ids is not None else None

        def end(outcome: str, message: str) -> list[bytes]:
            self.metrics.stream_resumes.labels(outcome=outcome).inc()
            log.warning("stream of %s not resumed: %s", model, message)
            return [error_event(message), DONE + b"\n\n"]

        if progress.finish_reason is not None:  # complete; only the end was lost
            self.metrics.stream_resumes.labels(outcome="completed").inc()
            return closing_events(
                progress,
                finish_reason=None,
                usage=self._owed_usage(request, progress, prompt_tokens, generated),
            )
        body = continuation(request.kind, request.body, progress, generated)
        if isinstance(body, str):
            if body == "budget spent":
                self.metrics.stream_resumes.labels(outcome="completed").inc()
                return closing_events(
                    progress,
                    finish_reason="length",
                    usage=self._owed_usage(request, progress, prompt_tokens, generated),
                )
            return end("unresumable", f"The engine serving this stream failed ({body} cannot "
                       "be continued elsewhere); retry the request.")  # fmt: skip
        if resumes >= self.resilience.max_resumes:
            return end("exhausted", "The engines serving this stream failed; retry the request.")
        raw = json.dumps(body).encode()
        upstream = dict(headers)
        while True:
            now = trio.current_time()
            session = session_key(routing.headers, headers.get("x-request-id", ""))
            candidates = [c for c in self.engines_for(model, session) if c.id not in failed]
            candidates = self.breakers.routable(candidates, [c.id for c in candidates], now)
            if not candidates or now >= deadline:
                return end("no_engine", "The engine serving this stream failed and no other "
                           "engine could continue it; retry the request.")  # fmt: skip
            engine = self.scheduler.schedule(routing, candidates, self.inflight.get, now).engine
            if engine is None:
                return end("no_engine", "No engine can continue this stream; retry the request.")
            failed.append(engine.id)
            if math.isfinite(deadline):
                upstream[TIMEOUT_HEADER] = f"{max(deadline - now, 0.001):.3f}"
            try:
                with trio.move_on_at(deadline):
                    forwarded = await self._open(engine, path, raw, upstream, request,
                                                 upstream.get("x-request-id", ""))  # fmt: skip
                    if forwarded.status == 200 and _is_sse(forwarded):
                        self.breakers.get(engine.id).success(trio.current_time())
                        self.metrics.stream_resumes.labels(outcome="resumed").inc()
                        log.info("stream of %s resumed on %s", model, engine.id)
                        return forwarded, Rewriter(
                            progress, prompt_tokens, generated, request.include_usage
                        )
                    await forwarded.discard()
                    if forwarded.status < 500:  # the continuation itself was refused
                        return end("refused", f"The engine serving this stream failed and the "
                                   f"continuation was refused ({forwarded.status}).")  # fmt: skip
            except UpstreamError as exc:
                log.warning("%s", exc)
                if exc.reason == "refused":
                    self.engine_down(engine.id, "connection refused", refused=True)
            self.breakers.get(engine.id).failure(trio.current_time())
            self.metrics.upstream_errors.labels(engine=engine.id).inc()

    def _owed_usage(
        self,
        request: ParsedRequest,
        progress: Progress,
        prompt_tokens: int | None,
        generated: int,
    ) -> dict[str, int] | None:
        """The usage chunk a client asked for and did not get yet."""
        if not request.include_usage or progress.usage_sent or prompt_tokens is None:
            return None
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": generated,
            "total_tokens": prompt_tokens + generated,
        }

    @contextlib.contextmanager
    def _watching(self, engine_id: str) -> Iterator[trio.CancelScope]:
        """A cancel scope that :meth:`engine_down` cancels: a wait on the engine (for a first
        byte, for a stream's next one) that ends if the engine is found dead."""
        scope = trio.CancelScope()
        waits = self._waits.setdefault(engine_id, set())
        waits.add(scope)
        try:
            with scope:
                yield scope
        finally:
            waits.discard(scope)

    def engine_down(self, engine_id: str, why: str, *, refused: bool = False) -> None:
        """The engine is dead or hung: eject it (its breaker opens) and end every wait on it,
        so requests not answered yet are retried elsewhere and started streams resumed.
        ``refused``: it refused a connection, so it is dead, not merely suspect (the ejection
        cap never lets it back in, :meth:`Breakers.routable`)."""
        now = trio.current_time()
        breaker = self.breakers.get(engine_id)
        if refused:
            breaker.refused(now)
        else:
            breaker.trip(now)
        self.progress[engine_id] = now
        waits = self._waits.get(engine_id, set())
        log.warning("engine %s down (%s): %d waiting requests moved", engine_id, why, len(waits))
        for scope in list(waits):
            scope.cancel()

    async def watch_silent(self) -> None:
        """Probe ``/health`` of engines that have requests in flight but sent nothing for
        ``probe_after_s``; one that fails within ``probe_timeout_s`` is :meth:`engine_down`.

        A whole engine process that hangs (SIGSTOP, a stuck host) is so found in seconds, not
        at the requests' deadlines. Probes use their own connections: a busy engine's pool may
        have none free.
        """
        cfg = self.resilience
        probing: set[str] = set()
        async with (
            httpx.AsyncClient(timeout=cfg.probe_timeout_s) as client,
            trio.open_nursery() as nursery,
        ):
            while True:
                await trio.sleep(cfg.probe_after_s / 2)
                now = trio.current_time()
                for engine_id, at in list(self.progress.items()):
                    if engine_id in probing or self.inflight.get(engine_id) == 0:
                        continue
                    view = self.registry.engine(engine_id)
                    if now - at >= cfg.probe_after_s and view is not None:
                        probing.add(engine_id)
                        nursery.start_soon(self._probe, client, view, probing)

    async def _probe(
        self, client: httpx.AsyncClient, engine: EngineView, probing: set[str]
    ) -> None:
        try:
            ok = False
            with trio.move_on_after(self.resilience.probe_timeout_s):
                try:
                    ok = (await client.get(engine.url + "/health")).status_code == 200
                except httpx.HTTPError:
                    ok = False
            if not ok and self.inflight.get(engine.id) > 0:
                self.metrics.stalls.labels(engine=engine.id).inc()
                self.engine_down(engine.id, "health probe failed with requests in flight")
            elif ok:
                self.progress[engine.id] = trio.current_time()  # alive: probe again later
        finally:
            probing.discard(engine.id)

    def incarnations(self, engines: list[EngineView]) -> None:
        """A new process under an engine's id (restarted, or placed again on another node after
        its node was lost) starts with a closed breaker: the old process's failures are not
        its own. ``engines``: the routable ones, as the agents report them."""
        for engine in engines:
            key = (engine.url, engine.pid)
            old = self._incarnation.get(engine.id)
            if old is not None and old != key:
                self.breakers.reset(engine.id)
                self.progress.pop(engine.id, None)
            self._incarnation[engine.id] = key

    def forget(self, keep: list[str]) -> None:
        """Drop per-engine state of engines that left (``keep``: the known ones)."""
        alive = set(keep)
        for engine_id in [e for e in self._incarnation if e not in alive]:
            del self._incarnation[engine_id]
        for engine_id in [e for e in self.progress if e not in alive]:
            del self.progress[engine_id]
        for engine_id in [e for e in self._waits if e not in alive and not self._waits[e]]:
            del self._waits[engine_id]

    def stalled(self, now: float, stall_s: float) -> list[str]:
        """Engines with requests in flight that sent nothing for ``stall_s`` seconds.

        vLLM's ``/health`` stays 200 when its engine core hangs; this is how such an engine is
        noticed. Each is reported once per stall (its clock restarts).
        """
        out = [
            engine_id
            for engine_id, at in self.progress.items()
            if self.inflight.get(engine_id) > 0 and now - at >= stall_s
        ]
        for engine_id in out:
            self.progress[engine_id] = now
        return out

    def _timeout_s(self, headers: dict[str, str]) -> float | None:
        """The request's deadline in seconds: ``x-request-timeout``, else the configured one.

        Raises:
            InvalidRequest: the header is not a positive number of seconds.
        """
        raw = headers.get(TIMEOUT_HEADER)
        if raw is None:
            return self.resilience.request_timeout_s
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise InvalidRequest(
                f"`{TIMEOUT_HEADER}` must be a positive number of seconds, got {raw!r}.",
                param=TIMEOUT_HEADER,
            )
        return value

    def _may_retry(
        self, candidates: list[EngineView], tried: list[str], *, free: bool = False
    ) -> bool:
        """Another engine is left, and the retry budget has a retry (``free``: a request no
        engine received, refused at connect, costs the budget nothing: it adds no load)."""
        if all(c.id in tried for c in candidates):
            return False
        if free:
            return True
        if not self.budget.try_retry(trio.current_time()):
            self.metrics.retry_budget_exhausted.inc()
            return False
        return True

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

    def _hold(self, engine_id: str, model: str | None = None) -> Callable[[], None]:
        """Count a request in flight on ``engine_id`` (and against ``model``'s slots there);
        returns its release (idempotent)."""
        if self.inflight.get(engine_id) == 0:  # an idle engine's silence was not a stall
            self.progress[engine_id] = trio.current_time()
        self.inflight.acquire(engine_id)
        gauge = self.metrics.child(self.metrics.inflight, engine_id)
        gauge.inc()
        by_engine = None if model is None else self._by_model.setdefault(model, InflightCounter())
        if by_engine is not None:
            by_engine.acquire(engine_id)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.inflight.release(engine_id)
                gauge.dec()
                if by_engine is not None:
                    by_engine.release(engine_id)

        return release

    def _held_off_routing(self, model: str) -> int:
        """``model``'s requests in flight on engines that no longer take traffic (draining
        or down): admission counts them apart from the routable engines' slots."""
        by_engine = self._by_model.get(model)
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

    async def _open(
        self,
        engine: EngineView,
        path: str,
        raw: bytes,
        headers: dict[str, str],
        request: ParsedRequest,
        request_id: str,
    ) -> Forwarded:
        call = tracing.start(
            "fleet.engine_call",
            {"fleet.engine.id": engine.id, "url.full": engine.url + path},
            kind=SpanKind.CLIENT,
        )
        headers = tracing.inject(headers, call)
        unhold, end_call = self._hold(engine.id, request.model), tracing.ender(call)

        def release() -> None:  # the engine's slot, and the call's span: once, when it is done
            unhold()
            end_call()

        started = self.clock()
        try:
            response = await self.pools.get(engine.url).request("POST", path, headers, raw)
        except (EngineHTTPError, EngineURLError) as exc:
            call.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            release()
            # refused: nothing listens (or the host refused), the engine is gone
            reason = exc.reason if isinstance(exc, EngineHTTPError) else "connect"
            raise UpstreamError(engine.id, f"{type(exc).__name__}: {exc}", reason) from exc
        except BaseException:
            release()
            raise
        took = self.clock() - started
        call.set_attribute("http.response.status_code", response.status)
        self.metrics.child(self.metrics.ttfb, request.model).observe(took)
        if response.status == 200:
            key = (request.model, request.stream)
            self._first_byte.setdefault(key, WaitEstimate()).record(took)
        self.progress[engine.id] = trio.current_time()
        out_headers = {k: v for k, v in response.headers if k not in HOP_BY_HOP}
        out_headers["x-request-id"] = request_id
        out_headers["x-selected-pod"] = engine.id

        async def body() -> AsyncIterator[bytes]:
            # Read to the body's end (a stream's chunked terminator included), so that the
            # connection goes back to the engine's pool; stopped early, it is closed.
            try:
                async for chunk in response.aiter_raw():
                    self.progress[engine.id] = trio.current_time()
                    yield chunk
            except EngineHTTPError as exc:
                # The stream broke after it started; resuming it is the resilience work's job.
                self.metrics.upstream_errors.labels(engine=engine.id).inc()
                log.warning("engine %s broke a response mid-way: %s", engine.id, exc)
            finally:
                release()
                response.close()

        async def discard() -> None:
            release()
            response.close()

        return Forwarded(response.status, out_headers, body(), engine, discard)


def _holding(forwarded: Forwarded, slot: contextlib.AsyncExitStack) -> Forwarded:
    """``forwarded``, holding the admission slot until its body is done or discarded."""
    inner_discard = forwarded.discard

    async def discard() -> None:
        try:
            await inner_discard()
        finally:
            await slot.aclose()

    forwarded.body = relay(forwarded.body, then=slot.aclose)
    forwarded.discard = discard
    return forwarded


async def relay(
    body: AsyncIterator[bytes], then: Callable[[], Awaitable[object]] | None = None
) -> AsyncIterator[bytes]:
    """Re-yield ``body``; when done, or abandoned (the client left), close it, then ``then()``."""
    try:
        async for chunk in body:
            yield chunk
    finally:
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            await aclose()
        if then is not None:
            await then()


async def _read_to_end(body: AsyncIterator[bytes]) -> None:
    """Read what follows a stream's ``[DONE]`` (its chunked terminator), for at most
    ``END_WAIT_S``: a body read to its end keeps its engine connection for the next request,
    where one closed before it would close the connection. Anything more is dropped."""
    with trio.move_on_after(END_WAIT_S):
        async for _ in body:
            pass


def _is_sse(forwarded: Forwarded) -> bool:
    return forwarded.headers.get("content-type", "").startswith("text/event-stream")


def _decision_attributes(decision: Decision) -> dict[str, str | bool | int | float]:
    """A scheduling decision, as span attributes."""
    out: dict[str, str | bool | int | float] = {
        "fleet.prefix_tokens": decision.prefix_tokens,
        "fleet.scheduling_ms": decision.scheduling_ms,
    }
    if decision.engine is not None:
        out["fleet.engine.id"] = decision.engine.id
    if decision.prefill is not None:
        out["fleet.prefill.engine.id"] = decision.prefill.id
    if decision.pd is not None:
        out["fleet.pd.split"] = decision.pd.split
        out["fleet.pd.reason"] = decision.pd.reason
    return out


def _decision_headers(
    headers: dict[str, str], decision: Decision, prefill: EngineView | None
) -> None:
    if prefill is not None:
        headers[PREFILL_POD_HEADER] = prefill.id
    headers["x-cache-prefix-length"] = str(decision.prefix_tokens)
    headers["x-scheduling-time-ms"] = f"{decision.scheduling_ms:.3f}"


__all__ = ["FORWARD_HEADERS", "Forwarded", "Gateway", "relay"]
