"""The response cache (docs/CACHE.md) on real processes: ``fleet up --engine sim`` with
``--response-cache memory``, and with a real redis-server that is stopped and started again.

The simulated engines decode at 20 ms a token, so a 32-token answer takes over 0.6 s and a hit,
served by the coordinator alone, is far faster. Clients are httpx and the official ``openai``
package.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from fleet.chaos import ChaosConfig, connect, run
from fleet.chaos.errors import ChaosError

from ..redisserver import RedisServer
from .fleetproc import FleetProcess, alive

REPLICAS = 2
SLOW = "--engine-arg=--sim-decode-ms-per-token=20"
CHAT = "/v1/chat/completions"


def _start(demo_model: Path, log_dir: Path, cache: str) -> FleetProcess:
    args = ["--engine", "sim", "--replicas", str(REPLICAS), "--model", str(demo_model),
            "--response-cache", cache, SLOW]  # fmt: skip
    proc = FleetProcess(args, log_dir)
    proc.wait_for(r"Fleet is serving `demo`", 120)
    proc.wait_ready(REPLICAS, 60)
    return proc


def _stop(proc: FleetProcess) -> None:
    pids = proc.descendants()
    if proc.proc.poll() is None:
        proc.stop(signal.SIGTERM)
    assert not alive(pids), f"left running: {sorted(alive(pids))}"


@pytest.fixture(scope="module")
def memory_fleet(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc = _start(demo_model, tmp_path_factory.mktemp("cache-memory-logs"), "memory")
    try:
        yield proc.url
    finally:
        _stop(proc)


def _chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "demo", "messages": [{"role": "user", "content": text}], "max_tokens": 32,
            "temperature": 0, **extra}  # fmt: skip


def _post(url: str, body: dict[str, Any], path: str = CHAT) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = httpx.post(url + path, json=body, timeout=30)
    return response, time.monotonic() - started


def _metric(url: str, name: str, **labels: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def _until(done: Callable[[], bool], what: str, timeout_s: float = 40.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.2)


def test_a_second_identical_request_hits_with_the_same_answer_far_faster(
    memory_fleet: str,
) -> None:
    for path, body in ((CHAT, _chat("Tell me about fleets")),
                       ("/v1/completions", {"model": "demo", "prompt": "Fleets are",
                                            "max_tokens": 32, "temperature": 0})):  # fmt: skip
        miss, miss_s = _post(memory_fleet, body, path)
        hit, hit_s = _post(memory_fleet, body, path)
        assert miss.status_code == hit.status_code == 200
        assert miss.headers["x-cache-hit"] == "false" and hit.headers["x-cache-hit"] == "true"
        assert "x-selected-pod" in miss.headers and "x-selected-pod" not in hit.headers
        assert miss.json()["choices"] == hit.json()["choices"]
        assert miss.json()["usage"] == hit.json()["usage"]
        assert hit.json()["id"] != miss.json()["id"]
        assert miss_s > 0.6 and hit_s < miss_s / 5, (miss_s, hit_s)
    assert _metric(memory_fleet, "fleet_response_cache_hits_total", layer="memory") >= 2
    assert _metric(memory_fleet, "fleet_response_cache_hit_ratio") > 0


def test_a_streamed_hit_replays_well_formed_through_the_openai_client(memory_fleet: str) -> None:
    client = openai.OpenAI(base_url=memory_fleet + "/v1", api_key="none", max_retries=0)
    messages: Any = [{"role": "user", "content": "Stream me a story"}]
    whole = client.chat.completions.create(model="demo", messages=messages, max_tokens=32,
                                           temperature=0)  # fmt: skip
    raw = client.chat.completions.with_raw_response.create(
        model="demo", messages=messages, max_tokens=32, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    assert raw.headers["x-cache-hit"] == "true"
    chunks = list(raw.parse())
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[-1].finish_reason
    ]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage == whole.usage
    # and the other way round: a streamed miss (its client asked for no usage) feeds a whole hit
    streamed = client.completions.create(model="demo", prompt="Once upon", max_tokens=32,
                                         temperature=0, stream=True)  # fmt: skip
    streamed_text = "".join(c.choices[0].text for c in streamed if c.choices)
    again = client.completions.with_raw_response.create(model="demo", prompt="Once upon",
                                                        max_tokens=32, temperature=0)  # fmt: skip
    assert again.headers["x-cache-hit"] == "true"
    completion = again.parse()
    assert completion.choices[0].text == streamed_text and completion.usage is not None


def test_sampled_requests_are_never_cached(memory_fleet: str) -> None:
    default = _chat("Flip a coin")
    del default["temperature"]  # the model's default: sampled
    for body in (_chat("Roll a die", temperature=0.9), default):
        for _ in range(2):
            response, _ = _post(memory_fleet, body)
            assert response.status_code == 200 and response.headers["x-cache-hit"] == "false"
    assert _metric(memory_fleet, "fleet_response_cache_skipped_total", reason="sampled") >= 4


def test_a_new_deployment_version_misses(memory_fleet: str, demo_model: Path) -> None:
    http = httpx.Client(base_url=memory_fleet, timeout=30)
    doc = {"apiVersion": "fleet.dev/v1alpha1", "kind": "FleetModel", "metadata": {"name": "beta"},
           "spec": {"servedModelNames": ["beta"], "source": str(demo_model), "version": "v1",
                    "replicas": 1}}  # fmt: skip
    assert http.post("/admin/v1/deployments", json=doc).status_code == 201
    try:
        _until(lambda: "beta" in [m["id"] for m in http.get("/v1/models").json()["data"]],
               "beta served")  # fmt: skip
        body = {**_chat("Which version?"), "model": "beta"}
        hits = [_post(memory_fleet, body)[0].headers["x-cache-hit"] for _ in range(2)]
        assert hits == ["false", "true"]
        doc["spec"]["version"] = "v2"  # type: ignore[index]
        assert http.put("/admin/v1/deployments/beta", json=doc).status_code == 200
        assert http.get("/admin/v1/deployments/beta").json()["version"] == "v2"
        hits = [_post(memory_fleet, body)[0].headers["x-cache-hit"] for _ in range(2)]
        assert hits == ["false", "true"]
    finally:
        http.delete("/admin/v1/deployments/beta")
        http.close()


async def test_the_redis_scenario_says_why_it_cannot_run_on_a_memory_cache(
    memory_fleet: str,
) -> None:
    async with httpx.AsyncClient() as http:
        target = await connect(memory_fleet, http)
        with pytest.raises(ChaosError, match="--response-cache redis://"):
            await run("response-cache-redis-down", target, ChaosConfig())


def test_a_redis_stopped_and_started_again_is_served_around_and_used_again(
    demo_model: Path, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path).start()
    proc = _start(demo_model, tmp_path / "logs", server.url)
    store = redis.Redis.from_url(server.url)
    try:
        url = proc.url
        first = _chat("Remember me")
        assert _post(url, first)[0].headers["x-cache-hit"] == "false"
        _until(lambda: len(store.keys("fleet:resp:*")) == 1, "the answer written to Redis")
        server.stop()
        response, _ = _post(url, _chat("Redis is gone"))
        assert response.status_code == 200 and response.headers["x-cache-hit"] == "false"
        again, _ = _post(url, first)  # the in-process LRU still has it
        assert again.status_code == 200 and again.headers["x-cache-hit"] == "true"
        for i in range(5):
            assert _post(url, _chat(f"Still gone {i}"))[0].status_code == 200
        assert _metric(url, "fleet_response_cache_redis_up") == 0
        assert _metric(url, "fleet_response_cache_redis_down_total") == 1
        log = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
        assert log.count("unreachable") == 1, log[-2000:]
        server.start()  # the same port, empty
        _until(lambda: _metric(url, "fleet_response_cache_redis_up") == 1, "redis in use again")
        after = _chat("Back again")
        assert _post(url, after)[0].headers["x-cache-hit"] == "false"
        _until(lambda: len(store.keys("fleet:resp:*")) == 1, "a new answer written to Redis")
        assert _post(url, after)[0].headers["x-cache-hit"] == "true"
        assert "reachable again" in "".join(
            p.read_text() for p in (tmp_path / "logs").glob("*.log")
        )
        assert json.loads(store.get(store.keys("fleet:resp:*")[0]))["kind"] == "chat"
    finally:
        store.close()
        _stop(proc)
        server.stop()
