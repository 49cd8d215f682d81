"""Circuit breakers, the ejection cap, the retry budget and backoff (fleet.coordinator.resilience),
and the gateway retrying on another engine over real simulated engines."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from fleet.coordinator.errors import NoCapacity
from fleet.coordinator.proxy import Gateway
from fleet.coordinator.registry import FleetRegistry
from fleet.coordinator.resilience import (
    Breakers,
    ResilienceConfig,
    RetryBudget,
    backoff_s,
)
from fleet.coordinator.validation import validate
from fleet.protocol.errors import ConfigError
from fleet.protocol.messages import EngineStatus, Register

from .simgateway import sim_gateway, start_hung_listener, start_sim, start_sim_server

CFG = ResilienceConfig()


# -- the breaker --------------------------------------------------------------------------------


def test_five_consecutive_failures_open_the_breaker_for_60_s_then_one_probe() -> None:
    b = Breakers().get("e")
    for t in range(4):
        b.failure(float(t * 20))  # spread out: only the consecutive count grows
        assert b.state == "closed"
    b.failure(80.0)
    assert b.state == "open" and not b.allow(80.0) and not b.allow(139.9)
    assert b.allow(140.0) and b.state == "half_open"
    assert not b.allow(140.1)  # one probe at a time
    b.success(141.0)
    assert b.state == "closed" and b.allow(141.0) and b.allow(141.0)


def test_five_failures_in_10_s_open_it_even_between_successes() -> None:
    b = Breakers().get("e")
    for t in (0.0, 2.0, 4.0, 6.0):
        b.failure(t)
        b.success(t + 0.5)
    assert b.state == "closed"
    b.failure(8.0)
    assert b.state == "open"
    spread = Breakers().get("f")
    for t in (0.0, 3.0, 6.0, 9.0, 12.0):  # never 5 within 10 s, never 5 in a row
        spread.failure(t)
        spread.success(t + 0.1)
    assert spread.state == "closed"


def test_a_failed_probe_opens_it_again_and_health_shortens_the_wait() -> None:
    b = Breakers().get("e")
    for _ in range(5):
        b.failure(0.0)
    assert b.allow(60.0) and b.state == "half_open"
    b.failure(60.5)
    assert b.state == "open" and not b.allow(100.0)
    b.health_ok(61.0)  # active health checks pass: try again 10 s later, not 60
    assert not b.allow(70.9) and b.allow(71.0)
    b.success(71.5)
    b.trip(72.0)  # a stall opens it at once, whatever its state
    assert b.state == "open" and not b.allow(100.0)


def test_ejection_never_takes_more_than_half_of_a_models_engines() -> None:
    breakers = Breakers()
    engines = ["a", "b", "c", "d"]
    for i, engine_id in enumerate(["a", "b", "c"]):
        for _ in range(5):
            breakers.get(engine_id).failure(float(i))  # a opened first, c last
    assert [breakers.get(e).state for e in engines] == ["open", "open", "open", "closed"]
    routable = breakers.routable(engines, engines, now=5.0)
    assert routable == ["c", "d"]  # 2 of 4 ejected at most; the most recently opened returns
    assert breakers.routable(engines[3:], engines[3:], now=5.0) == ["d"]


def test_the_cap_never_lets_a_dead_engine_back_in_over_a_suspect_one() -> None:
    breakers = Breakers()
    engines = ["a1", "a2", "a3", "b1", "b2", "b3"]
    for engine_id in ["a1", "a2", "a3"]:  # suspect: tripped by failed health probes
        breakers.get(engine_id).trip(1.0)
    for engine_id in ["b1", "b2", "b3"]:  # dead: refused connections, opened last
        breakers.get(engine_id).refused(2.0)
    # The dead are out and not counted: of the 3 that may answer, at most 1 stays ejected.
    routable = breakers.routable(engines, engines, now=3.0)
    assert routable == ["a2", "a3"] or routable == ["a1", "a2"] or routable == ["a1", "a3"]
    assert not {"b1", "b2", "b3"} & set(routable)
    # Every engine dead: none is routable until its open period is over, then it is probed.
    assert breakers.routable(engines[3:], engines[3:], now=3.0) == []
    assert breakers.routable(engines[3:], engines[3:], now=62.0) == engines[3:]
    b1 = breakers.get("b1")
    assert b1.allow(62.0) and b1.state == "half_open"
    b1.success(62.5)  # it answers again: not dead any more
    assert not b1.dead and b1.state == "closed"


def test_retry_budget_is_a_tenth_of_requests_plus_a_floor() -> None:
    cfg = ResilienceConfig(budget_min_per_s=0.3, budget_ratio=0.1, budget_window_s=10)
    budget = RetryBudget(cfg)
    for _ in range(20):
        budget.request(0.0)
    assert [budget.try_retry(1.0) for _ in range(6)] == [True] * 5 + [False]  # 0.1 × 20 + 3
    assert budget.try_retry(11.5)  # the window moved on: requests and retries forgotten


def test_backoff_is_jittered_exponential() -> None:
    rng = random.Random(1)
    draws = [backoff_s(CFG, 3, rng) for _ in range(200)]
    assert all(0 <= d <= 0.4 for d in draws) and max(draws) > 0.3
    assert backoff_s(ResilienceConfig(base_backoff_s=0), 2, rng) == 0


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ConfigError):
        ResilienceConfig(max_ejected_share=1.5)
    with pytest.raises(ConfigError):
        ResilienceConfig(max_attempts=0)


# -- the gateway over real simulated engines ----------------------------------------------------


@dataclass
class Pair:
    gateway: Gateway
    urls: dict[str, str]


@pytest.fixture
async def pair(demo_model: Path, nursery: trio.Nursery) -> AsyncIterator[Pair]:
    fast = ("--sim-prefill-ms-per-token", "0.01", "--sim-decode-ms-per-token", "0.5")
    urls = {
        "good": await start_sim(demo_model, nursery, *fast),
        "bad": await start_sim(demo_model, nursery, *fast, "--sim-fault", "fail_fraction=1"),
    }
    gateway, pools = sim_gateway(urls, demo_model, ResilienceConfig(base_backoff_s=0.001))
    yield Pair(gateway, urls)
    await pools.aclose()
    nursery.cancel_scope.cancel()


async def _complete(gateway: Gateway) -> tuple[int, str, bytes]:
    raw = json.dumps({"model": "demo", "prompt": "hello", "max_tokens": 2}).encode()
    parsed = validate("completion", raw)
    forwarded = await gateway.forward("/v1/completions", parsed, raw, {})
    body = b"".join([chunk async for chunk in forwarded.body])
    return forwarded.status, forwarded.headers["x-selected-pod"], body


async def test_a_failing_engine_is_retried_elsewhere_then_ejected(pair: Pair) -> None:
    gateway = pair.gateway
    results = [await _complete(gateway) for _ in range(12)]
    assert all(status == 200 for status, _, _ in results)  # never a failure for the client
    assert {pod for _, pod, _ in results} == {"good"}
    assert gateway.breakers.get("bad").state == "open"
    retries = gateway.metrics.retries.labels(reason="5xx")._value.get()
    assert 1 <= retries <= 5  # the bad engine was tried until its breaker opened, then never
    assert gateway.inflight.get("bad") == gateway.inflight.get("good") == 0


async def test_with_every_engine_failing_the_client_gets_the_engines_error(pair: Pair) -> None:
    gateway = pair.gateway
    async with httpx.AsyncClient() as http:
        await http.post(pair.urls["good"] + "/sim/faults", json={"fail_fraction": 1.0})
    status, _, body = await _complete(gateway)
    assert status == 500 and b"InternalServerError" in body  # vLLM's own error, passed on
    # breakers and the budget bound retries: 20 requests to a sick fleet make at most
    # 0.1 × 20 + 1/s × 10 s of them
    for _ in range(19):
        await _complete(gateway)
    assert gateway.metrics.retries.labels(reason="5xx")._value.get() <= 0.1 * 20 + 10
    assert {gateway.breakers.get(e).state for e in ("good", "bad")} <= {"open", "half_open"}


async def test_no_engine_reachable_gives_503(pair: Pair, demo_model: Path) -> None:
    registry = FleetRegistry(lost_after_s=60)
    dead = EngineStatus(engine_id="dead", model="demo", url="http://127.0.0.1:9", state="ready")
    registry.register(Register("n2", "", "test", (), (dead,)), trio.current_time())
    pair.gateway.registry = registry
    with pytest.raises(NoCapacity) as err:
        await _complete(pair.gateway)
    assert "answered" in str(err.value) and err.value.retry_after_s == 1


async def test_a_deadline_bounds_the_wait_for_a_hung_engine(pair: Pair) -> None:
    from fleet.coordinator.errors import DeadlineExceeded, InvalidRequest

    async with httpx.AsyncClient() as http:
        await http.post(pair.urls["good"] + "/sim/faults", json={"hang": True})
    raw = json.dumps({"model": "demo", "prompt": "hello", "max_tokens": 2}).encode()
    parsed = validate("completion", raw)
    with pytest.raises(DeadlineExceeded) as err:
        await pair.gateway.forward("/v1/completions", parsed, raw, {"x-request-timeout": "0.5"})
    # The 504 names the request's deadline: neither the pool's 10 s read timeout nor a retry
    # on the failing engine ended it (test_attempts tests the rule with explicit times).
    assert err.value.status == 504 and "(0.5 s)" in err.value.message
    assert pair.gateway.breakers.get("good").consecutive == 0  # slow is not failed
    assert pair.gateway.inflight.get("good") == 0  # the hung attempt was released
    for bad in ("0", "-1", "soon", "nan", "inf"):
        with pytest.raises(InvalidRequest) as bad_err:
            await pair.gateway.forward("/v1/completions", parsed, raw, {"x-request-timeout": bad})
        assert bad_err.value.param == "x-request-timeout"


async def test_a_hung_engine_whose_health_passes_is_found_stalled(
    demo_model: Path, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """vLLM's ``/health`` stays 200 when its engine core hangs, and so does the simulator's
    under its ``hang`` fault: the watcher's probes pass, yet the stream waiting on it moves
    once the engine was silent for ``stall_s``, long before its idle bound (60 s) or its
    deadline; with no other engine, the client's stream ends with an error event."""
    _, url = await start_sim_server(demo_model, nursery, "--sim-fault", "hang")
    cfg = ResilienceConfig(probe_after_s=0.1, probe_timeout_s=2.0, stall_s=1.0, stream_idle_s=60)
    gateway, pools = sim_gateway({"bad": url}, demo_model, cfg)
    nursery.start_soon(gateway.watch_silent)
    body = {"model": "demo", "prompt": "hello", "max_tokens": 2, "stream": True}
    raw = json.dumps(body).encode()
    headers = {"x-request-timeout": "120"}
    try:
        forwarded = await gateway.forward(
            "/v1/completions", validate("completion", raw), raw, headers
        )
    except NoCapacity as exc:  # the engine had not even started the response
        assert "stopped answering" in str(exc)
    else:
        text = b"".join([chunk async for chunk in forwarded.body])
        assert b'"error"' in text and text.endswith(b"data: [DONE]\n\n")
    assert gateway.metrics.stalls.labels(engine="bad")._value.get() == 1
    assert gateway.breakers.get("bad").state == "open"
    assert "engine bad down (stalled: requests in flight, no output)" in caplog.text
    assert "health probe failed" not in caplog.text  # every probe passed
    assert gateway.inflight.get("bad") == 0
    await pools.aclose()
    nursery.cancel_scope.cancel()


async def test_requests_waiting_on_a_hung_engine_move_when_its_health_probe_fails(
    demo_model: Path, nursery: trio.Nursery
) -> None:
    fast = ("--sim-prefill-ms-per-token", "0.01", "--sim-decode-ms-per-token", "0.5")
    urls = {
        "hung": await start_hung_listener(nursery),
        "good": await start_sim(demo_model, nursery, *fast),
    }
    cfg = ResilienceConfig(base_backoff_s=0.001, probe_after_s=0.2, probe_timeout_s=0.3)
    gateway, pools = sim_gateway(urls, demo_model, cfg)
    nursery.start_soon(gateway.watch_silent)
    raw = json.dumps({"model": "demo", "prompt": "hello", "max_tokens": 2}).encode()
    results: list[tuple[int, str]] = []

    async def one() -> None:
        forwarded = await gateway.forward(
            "/v1/completions", validate("completion", raw), raw, {"x-request-timeout": "10"}
        )
        b"".join([chunk async for chunk in forwarded.body])
        results.append((forwarded.status, forwarded.headers["x-selected-pod"]))

    async with trio.open_nursery() as requests:
        for _ in range(8):
            requests.start_soon(one)
    # Each would have ended at its 10 s deadline with 504 (a read timeout there leaves no
    # time for a retry) had the failed probe not moved it.
    assert results == [(200, "good")] * 8
    assert gateway.breakers.get("hung").state == "open"
    assert gateway.metrics.stalls.labels(engine="hung")._value.get() == 1
    assert gateway.inflight.get("hung") == 0
    await pools.aclose()
    nursery.cancel_scope.cancel()


async def test_a_new_process_under_an_engines_id_starts_with_a_closed_breaker(pair: Pair) -> None:
    import dataclasses

    gateway = pair.gateway
    views = gateway.registry.routable("demo")
    gateway.health.incarnations(views)
    gateway.breakers.get("good").trip(trio.current_time())
    gateway.health.incarnations(views)  # the same processes: the breaker stays open
    assert gateway.breakers.get("good").state == "open"
    restarted = [dataclasses.replace(v, pid=v.pid + 1) if v.id == "good" else v for v in views]
    gateway.health.incarnations(restarted)
    assert gateway.breakers.get("good").state == "closed"


async def test_a_refused_connection_ejects_the_engine_at_once_and_costs_no_budget(
    demo_model: Path, nursery: trio.Nursery
) -> None:
    from fleet.agent.launcher import free_port

    fast = ("--sim-prefill-ms-per-token", "0.01", "--sim-decode-ms-per-token", "0.5")
    urls = {
        "dead": f"http://127.0.0.1:{free_port()}",  # nothing listens: a killed engine
        "good": await start_sim(demo_model, nursery, *fast),
    }
    cfg = ResilienceConfig(base_backoff_s=0.001, budget_ratio=0.0, budget_min_per_s=0.0)
    gateway, pools = sim_gateway(urls, demo_model, cfg)  # no retry budget at all
    results = [await _complete(gateway) for _ in range(6)]
    assert [(status, pod) for status, pod, _ in results] == [(200, "good")] * 6
    assert gateway.breakers.get("dead").state == "open"  # after its first refusal
    assert gateway.metrics.retries.labels(reason="refused")._value.get() <= 1
    await pools.aclose()
    nursery.cancel_scope.cancel()


async def test_a_refused_connection_costs_no_try(demo_model: Path, nursery: trio.Nursery) -> None:
    from fleet.agent.launcher import free_port

    fast = ("--sim-prefill-ms-per-token", "0.01", "--sim-decode-ms-per-token", "0.5")
    urls = {f"dead{i}": f"http://127.0.0.1:{free_port()}" for i in range(3)}
    urls["good"] = await start_sim(demo_model, nursery, *fast)
    nodes = {engine_id: f"node-{engine_id}" for engine_id in urls}  # no node preference helps
    cfg = ResilienceConfig(max_attempts=1, budget_ratio=0.0, budget_min_per_s=0.0)
    gateway, pools = sim_gateway(urls, demo_model, cfg, nodes)
    results = [await _complete(gateway) for _ in range(3)]
    # One try in all, no budget: only the free retries after refusals reach the good engine.
    assert [(status, pod) for status, pod, _ in results] == [(200, "good")] * 3
    assert gateway.metrics.retries.labels(reason="refused")._value.get() >= 1
    await pools.aclose()
    nursery.cancel_scope.cancel()


async def test_dead_engines_do_not_crowd_out_suspect_ones(
    demo_model: Path, nursery: trio.Nursery
) -> None:
    """A node dies (its engines refuse connections) while the other node's engines were
    ejected by failed health probes (CPU-starved, not dead): requests go to the suspect
    engines, not back to the dead ones (CI: one 503 after 3 refusals in agent-kill)."""
    from fleet.agent.launcher import free_port

    fast = ("--sim-prefill-ms-per-token", "0.01", "--sim-decode-ms-per-token", "0.5")
    urls = {f"dead{i}": f"http://127.0.0.1:{free_port()}" for i in range(3)}
    for i in range(3):
        urls[f"good{i}"] = await start_sim(demo_model, nursery, *fast)
    nodes = {e: "dead-node" if e.startswith("dead") else "good-node" for e in urls}
    gateway, pools = sim_gateway(urls, demo_model, ResilienceConfig(), nodes)
    for i in range(3):
        gateway.engine_down(f"good{i}", "health probe failed with requests in flight")
    for i in range(3):
        gateway.engine_down(f"dead{i}", "connection refused", refused=True)
    results = [await _complete(gateway) for _ in range(6)]
    assert [status for status, _, _ in results] == [200] * 6
    assert {pod for _, pod, _ in results} <= {"good0", "good1", "good2"}
    assert gateway.metrics.retries.labels(reason="refused")._value.get() == 0
    await pools.aclose()
    nursery.cancel_scope.cancel()


async def test_a_retry_goes_to_another_node(demo_model: Path, nursery: trio.Nursery) -> None:
    fast = ("--sim-prefill-ms-per-token", "0.01", "--sim-decode-ms-per-token", "0.5")
    failing = (*fast, "--sim-fault", "fail_fraction=1")
    urls = {
        "sick1": await start_sim(demo_model, nursery, *failing),
        "sick2": await start_sim(demo_model, nursery, *failing),
        "good": await start_sim(demo_model, nursery, *fast),
    }
    nodes = {"sick1": "sick-node", "sick2": "sick-node", "good": "well-node"}
    cfg = ResilienceConfig(max_attempts=2, base_backoff_s=0.001, budget_ratio=1.0)
    gateway, pools = sim_gateway(urls, demo_model, cfg, nodes)
    results = [await _complete(gateway) for _ in range(12)]
    # Two tries: one on the sick node at most, the other on the node not yet tried.
    assert [status for status, _, _ in results] == [200] * 12, [(s, p) for s, p, _ in results][6:]
    assert {pod for _, pod, _ in results} == {"good"}
    assert gateway.metrics.retries.labels(reason="5xx")._value.get() >= 1
    await pools.aclose()
    nursery.cancel_scope.cancel()
