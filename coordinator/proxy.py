"""Forward a validated request to an engine and pass its answer back, streaming unbuffered.

The engine is chosen by the scheduling pipeline (:mod:`.router`): the prompt is tokenized the
way the engine will see it (only when the profile has a prefix scorer), then filtered, scored and
picked. The client's body bytes go to the engine unchanged. Engine failures before a response are
translated to :class:`UpstreamError` (``from`` the httpx error) and the pipeline picks again
among the engines not yet tried; once a response has started, its bytes go to the client as they
arrive. Every routed response carries ``x-request-id``, ``x-selected-pod`` (the engine id),
``x-cache-prefix-length`` (prompt tokens the engine holds in its prefix cache, per the KV index)
and ``x-scheduling-time-ms`` (filter + score + pick; tokenizing is not included).
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import trio

from .errors import ModelNotFound, NoCapacity, UpstreamError
from .metrics import CoordinatorMetrics
from .picker import InflightCounter
from .pools import EnginePools
from .registry import EngineView, FleetRegistry
from .router.prompt import PromptTokenizer, RoutingRequest
from .router.scheduler import Decision, Scheduler
from .validation import ParsedRequest

log = logging.getLogger(__name__)

# Headers worth passing to the engine; everything else (host, cookies, auth) stays here.
FORWARD_HEADERS = ("content-type", "accept", "x-request-id", "traceparent", "tracestate")
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


class Gateway:
    """Routes requests to engines and proxies the answers.

    Args:
        pools: one httpx client per engine (owned by the coordinator service).
        registry: where routable engines come from.
        metrics: where counts go.
        scheduler: the scheduling pipeline.
        tokenizer: tokenizes prompts for prefix matching.
        max_attempts: engines tried for one request when connecting fails.
    """

    def __init__(
        self,
        pools: EnginePools,
        registry: FleetRegistry,
        metrics: CoordinatorMetrics,
        *,
        scheduler: Scheduler,
        tokenizer: PromptTokenizer,
        max_attempts: int = 2,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.pools = pools
        self.registry = registry
        self.metrics = metrics
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.inflight = InflightCounter()
        self.max_attempts = max_attempts
        self.rng = rng or random.Random()
        self.clock = clock

    async def forward(
        self, path: str, request: ParsedRequest, raw: bytes, headers: dict[str, str]
    ) -> Forwarded:
        """Pick an engine for ``request`` and open its response.

        Raises:
            ModelNotFound: no engine serves the model.
            NoCapacity: engines exist but none answered.
        """
        candidates = self.registry.routable(request.model)
        if not candidates:
            if any(e.model == request.model for e in self.registry.engines()):
                raise NoCapacity(
                    f"The model `{request.model}` has no ready engine right now "
                    "(starting or restarting); retry shortly.",
                    retry_after_s=5,
                )
            raise ModelNotFound(request.model)
        request_id = headers.get("x-request-id") or f"fleet-{uuid.uuid4().hex}"
        upstream_headers = {k: v for k, v in headers.items() if k in FORWARD_HEADERS}
        upstream_headers["x-request-id"] = request_id
        upstream_headers.setdefault("content-type", "application/json")
        routing = await self.routing_request(request, headers)
        tried: list[str] = []
        last_error: UpstreamError | None = None
        for _ in range(self.max_attempts):
            left = [c for c in candidates if c.id not in tried]
            if not left:
                break
            decision = self.scheduler.schedule(
                routing, left, self.inflight.get, trio.current_time()
            )
            engine = decision.engine
            if engine is None:
                if not tried:
                    raise NoCapacity(
                        f"No engine for `{request.model}` passes the scheduling filters.",
                        retry_after_s=5,
                    )
                break
            tried.append(engine.id)
            try:
                forwarded = await self._open(
                    engine, path, raw, upstream_headers, request, request_id
                )
            except UpstreamError as exc:
                last_error = exc
                self.metrics.upstream_errors.labels(engine=engine.id).inc()
                log.warning("%s", exc)
                continue
            self.scheduler.served(routing, engine.id, trio.current_time())
            _decision_headers(forwarded.headers, decision)
            return forwarded
        raise NoCapacity(
            f"No engine for `{request.model}` answered ({last_error}); retry shortly.",
            retry_after_s=1,
        )

    async def routing_request(
        self, request: ParsedRequest, headers: dict[str, str]
    ) -> RoutingRequest:
        """What the pipeline needs of a request: its prompt's tokens when a scorer uses them."""
        routing = RoutingRequest(request.model, headers=headers)
        if self.scheduler.profile.needs_tokens:
            started = self.clock()
            routing.token_ids = await self.tokenizer.tokens(
                request.model, request.kind, request.body
            )
            routing.tokenize_ms = (self.clock() - started) * 1000
        return routing

    async def _open(
        self,
        engine: EngineView,
        path: str,
        raw: bytes,
        headers: dict[str, str],
        request: ParsedRequest,
        request_id: str,
    ) -> Forwarded:
        self.inflight.acquire(engine.id)
        self.metrics.inflight.labels(engine=engine.id).inc()
        started = self.clock()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.inflight.release(engine.id)
                self.metrics.inflight.labels(engine=engine.id).dec()

        try:
            client = self.pools.get(engine.url)
            upstream = client.build_request("POST", engine.url + path, content=raw, headers=headers)
            response = await client.send(upstream, stream=True)
        except httpx.HTTPError as exc:
            release()
            raise UpstreamError(engine.id, f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            release()
            raise
        self.metrics.ttfb.labels(model=request.model).observe(self.clock() - started)
        out_headers = {k: v for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP}
        out_headers["x-request-id"] = request_id
        out_headers["x-selected-pod"] = engine.id

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.aiter_raw():
                    yield chunk
            except httpx.HTTPError as exc:
                # The stream broke after it started; resuming it is the resilience work's job.
                self.metrics.upstream_errors.labels(engine=engine.id).inc()
                log.warning("engine %s broke a response mid-way: %s", engine.id, exc)
            finally:
                release()
                await response.aclose()

        return Forwarded(response.status_code, out_headers, body(), engine)


def _decision_headers(headers: dict[str, str], decision: Decision) -> None:
    headers["x-cache-prefix-length"] = str(decision.prefix_tokens)
    headers["x-scheduling-time-ms"] = f"{decision.scheduling_ms:.3f}"


__all__ = ["FORWARD_HEADERS", "Forwarded", "Gateway"]
