"""How long a request waits in the admission queue for an engine that is not there yet (a
deployment scaling from zero): its own deadline (``x-request-timeout``) when it has one, else
``max_queue_wait_s``. Virtual time: trio's MockClock, no engine and no network."""

from __future__ import annotations

import json
import random

import httpx
import pytest
import trio
import trio.testing

from fleet.coordinator.admission import Overloaded
from fleet.coordinator.kvindex import KVIndex
from fleet.coordinator.metrics import CoordinatorMetrics
from fleet.coordinator.pools import EnginePools
from fleet.coordinator.proxy import Gateway
from fleet.coordinator.registry import FleetRegistry
from fleet.coordinator.resilience import ResilienceConfig
from fleet.coordinator.router.config import DEFAULT_CONFIG, load_config
from fleet.coordinator.router.prompt import PromptTokenizer
from fleet.coordinator.router.scheduler import Scheduler
from fleet.coordinator.validation import validate


def gateway(max_queue_wait_s: float) -> Gateway:
    """A gateway for a deployed model ``zero`` that has no engine (scaled to zero)."""
    return Gateway(
        EnginePools(timeout=httpx.Timeout(5.0), max_connections=4, max_keepalive=4),
        FleetRegistry(lost_after_s=60),
        CoordinatorMetrics(),
        scheduler=Scheduler(load_config(DEFAULT_CONFIG), KVIndex(), rng=random.Random(0)),
        tokenizer=PromptTokenizer({}),
        resilience=ResilienceConfig(),
        max_queue_wait_s=max_queue_wait_s,
        is_deployed=lambda model: model == "zero",
    )


async def waited(gw: Gateway, headers: dict[str, str]) -> float:
    """Seconds a request for ``zero`` waited before its 503."""
    raw = json.dumps({"model": "zero", "prompt": "hi", "max_tokens": 2}).encode()
    start = trio.current_time()
    with pytest.raises(Overloaded):
        await gw.forward("/v1/completions", validate("completion", raw), raw, headers)
    return trio.current_time() - start


async def test_the_requests_deadline_bounds_its_wait_not_the_default(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gw = gateway(max_queue_wait_s=30.0)
    assert await waited(gw, {}) == pytest.approx(30.0)  # no deadline: the default bound
    # A client that gives itself 300 s (an engine starting from zero takes minutes on GPUs)
    # waits up to that, not the 30 s default; and a shorter deadline stops it sooner.
    assert await waited(gw, {"x-request-timeout": "300"}) == pytest.approx(300.0)
    assert await waited(gw, {"x-request-timeout": "5"}) == pytest.approx(5.0)
    assert await waited(gateway(max_queue_wait_s=90.0), {}) == pytest.approx(90.0)
