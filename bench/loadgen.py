"""An open-loop load generator: requests leave on a Poisson schedule whatever the server does.

Closed-loop clients (N workers, each waiting for its answer) slow down with the server and hide
queueing; an open loop keeps offering load, so latency under load is real. Arrival times are drawn
up front from a seeded RNG, so two targets in one run see the same schedule. Streaming requests
measure time to first token (the first SSE event that carries text).

Raw proxy throughput is measured with ``wrk`` (C, closed loop) instead: one Python process on a
2-core machine cannot offer more requests per second than a fast proxy absorbs.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio


@dataclass(frozen=True)
class Request:
    """One request of a workload."""

    path: str
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Sample:
    """What happened to one request (times in seconds from the run's start)."""

    scheduled_s: float
    start_s: float
    ttft_s: float | None
    latency_s: float
    status: int  # 0: no HTTP answer at all
    error: str
    pod: str
    completion_tokens: int

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error


def poisson_schedule(n: int, rate_rps: float, seed: int) -> list[float]:
    """Arrival offsets (s) of ``n`` requests at an average ``rate_rps``."""
    rng = random.Random(seed)
    t = 0.0
    out = []
    for _ in range(n):
        t += rng.expovariate(rate_rps)
        out.append(t)
    return out


async def open_loop(
    base_url: str,
    requests: Sequence[Request],
    schedule: Sequence[float],
    *,
    timeout_s: float = 60.0,
    max_inflight: int = 2000,
) -> list[Sample]:
    """Send ``requests[i]`` at ``schedule[i]`` seconds after start; return one sample each."""
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=max_inflight, max_keepalive_connections=max_inflight)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            for req, at in zip(requests, schedule, strict=True):
                await trio.sleep_until(t0 + at)
                nursery.start_soon(_one, client, req, at, t0, samples)
    return samples


async def _one(
    client: httpx.AsyncClient, req: Request, at: float, t0: float, out: list[Sample]
) -> None:
    start = trio.current_time()
    ttft: float | None = None
    status = 0
    error = ""
    pod = ""
    tokens = 0
    try:
        async with client.stream("POST", req.path, json=req.body, headers=req.headers) as resp:
            status = resp.status_code
            pod = resp.headers.get("x-selected-pod", "")
            if req.body.get("stream"):
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if ttft is None and _has_text(chunk):
                        ttft = trio.current_time() - start
                    usage = chunk.get("usage")
                    if usage:
                        tokens = int(usage.get("completion_tokens", 0))
            else:
                body = json.loads(await resp.aread())
                ttft = trio.current_time() - start
                tokens = int((body.get("usage") or {}).get("completion_tokens", 0))
            if status != 200:
                error = f"HTTP {status}"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:200]
    end = trio.current_time()
    out.append(Sample(at, start - t0, ttft, end - start, status, error, pod, tokens))


def _has_text(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or []:
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
    return False


def wall_clock() -> float:
    """Seconds since the epoch (for result files)."""
    return time.time()


__all__ = ["Request", "Sample", "open_loop", "poisson_schedule", "wall_clock"]
