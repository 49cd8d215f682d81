"""Forward a validated request to an engine and pass its answer back, streaming unbuffered.

The client's body bytes go to the engine unchanged. Engine failures before a response are
translated to :class:`UpstreamError` (``from`` the httpx error) and the next candidate engine is
tried; once a response has started, its bytes go to the client as they arrive.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx

from .errors import ModelNotFound, NoCapacity, UpstreamError
from .metrics import CoordinatorMetrics
from .picker import InflightCounter, pick_least_loaded
from .pools import EnginePools
from .registry import EngineView, FleetRegistry
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
        max_attempts: engines tried for one request when connecting fails.
    """

    def __init__(
        self,
        pools: EnginePools,
        registry: FleetRegistry,
        metrics: CoordinatorMetrics,
        *,
        max_attempts: int = 2,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.pools = pools
        self.registry = registry
        self.metrics = metrics
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
        tried: list[str] = []
        last_error: UpstreamError | None = None
        for _ in range(self.max_attempts):
            engine = pick_least_loaded(
                [c for c in candidates if c.id not in tried], self.inflight, self.rng
            )
            if engine is None:
                break
            tried.append(engine.id)
            try:
                return await self._open(engine, path, raw, upstream_headers, request, request_id)
            except UpstreamError as exc:
                last_error = exc
                self.metrics.upstream_errors.labels(engine=engine.id).inc()
                log.warning("%s", exc)
        raise NoCapacity(
            f"No engine for `{request.model}` answered ({last_error}); retry shortly.",
            retry_after_s=1,
        )

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


__all__ = ["FORWARD_HEADERS", "Forwarded", "Gateway"]
