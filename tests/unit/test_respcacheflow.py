"""The response cache on the request path (coordinator/respcacheflow.py) and its store
(coordinator/respcachestore.py): the forward is our own seam (a function answering as vLLM
does); Redis is a real redis-server (tests/redisserver.py)."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
import redis
from prometheus_client import CollectorRegistry

from fleet.coordinator.deploybook import DeploymentBook
from fleet.coordinator.deployment import Deployment
from fleet.coordinator.fastroutes import Reply
from fleet.coordinator.placement import Placer
from fleet.coordinator.registry import EngineView
from fleet.coordinator.respcache import Answer
from fleet.coordinator.respcacheflow import CachedInference, Identities
from fleet.coordinator.respcachestore import PREFIX, ResponseCache, ResponseCacheConfig
from fleet.coordinator.respreplay import render_body, render_stream
from fleet.coordinator.validation import ParsedRequest, validate
from fleet.protocol.errors import ConfigError

from ..redisserver import RedisServer

ANSWER = Answer("chat", "Hello there", "stop", None, 7, 3, "fp")


def _engine(engine_id: str, model: str = "m") -> EngineView:
    return EngineView(id=engine_id, node="n", model=model, url="http://e", pid=1,
                      state="ready", role="both", kind="sim", restarts=0, block_size=16,
                      gpus=(), routable=True)  # fmt: skip


class Engine:
    """The forward: answers as vLLM would, from engine ``m-0``; records what it was sent."""

    def __init__(self, answer: Answer = ANSWER) -> None:
        self.answer = answer
        self.sent: list[tuple[ParsedRequest, bytes]] = []
        self.closed = 0

    async def __call__(self, parsed: ParsedRequest, raw: bytes) -> Reply:
        self.sent.append((parsed, raw))
        headers = {"x-selected-pod": "m-0"}
        answer = replace(self.answer, kind=parsed.kind)
        if not parsed.stream:
            body = render_body(answer, model=parsed.model, request_id="e", created=1)
            return Reply(200, headers, body=body)
        events = render_stream(answer, model=parsed.model, request_id="e", created=1,
                               include_usage=parsed.include_usage)  # fmt: skip
        return Reply(200, {**headers, "content-type": "text/event-stream"},
                     stream=self._stream(events))  # fmt: skip

    async def _stream(self, events: list[bytes]) -> AsyncIterator[bytes]:
        try:
            for event in events:
                yield event[:9]
                yield event[9:]
        finally:
            self.closed += 1


def _flow(version_of: dict[str, str] | None = None) -> tuple[CachedInference, ResponseCache]:
    deployment = Deployment(model="m", model_path="/models/m", replicas=1)
    placer = Placer((deployment,), assign_timeout_s=30)
    cache = ResponseCache(ResponseCacheConfig("memory"), CollectorRegistry())
    return CachedInference(cache, Identities(placer, DeploymentBook(), lambda: [])), cache


def _request(kind: str = "chat", **body: object) -> tuple[ParsedRequest, bytes]:
    doc: dict[str, object] = {"model": "m", "temperature": 0, **body}
    if kind == "chat":
        doc.setdefault("messages", [{"role": "user", "content": "Hi"}])
    else:
        doc.setdefault("prompt", "Hi")
    raw = json.dumps(doc).encode()
    return validate(kind, raw), raw  # type: ignore[arg-type]


async def _read(reply: Reply) -> bytes:
    if reply.stream is None:
        return reply.body
    return b"".join([chunk async for chunk in reply.stream])


async def test_a_second_identical_request_is_answered_from_the_cache() -> None:
    flow, cache = _flow()
    engine = Engine()
    first = await flow.serve(*_request(), {}, engine)
    assert first.headers["x-cache-hit"] == "false"
    await _read(first)
    second = await flow.serve(*_request(), {"x-request-id": "abc"}, engine)
    assert second.headers["x-cache-hit"] == "true" and len(engine.sent) == 1
    body = json.loads(second.body)
    assert body["id"] == "chatcmpl-abc" and body["choices"][0]["message"]["content"] == ANSWER.text
    assert cache.metrics.hit_ratio._value.get() == 0.5


async def test_a_streamed_miss_asks_for_usage_hides_it_and_feeds_a_whole_hit() -> None:
    flow, _ = _flow()
    engine = Engine()
    reply = await flow.serve(*_request(stream=True), {}, engine)
    streamed = await _read(reply)
    sent, raw = engine.sent[0]
    assert sent.include_usage and json.loads(raw)["stream_options"] == {"include_usage": True}
    assert b'"choices":[]' not in streamed and streamed.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' not in streamed
    hit = await flow.serve(*_request(), {}, engine)
    assert hit.headers["x-cache-hit"] == "true"
    assert json.loads(hit.body)["usage"]["completion_tokens"] == 3
    replay = await _read(await flow.serve(*_request(stream=True), {}, engine))
    assert replay.count(b"data: ") == 4 and b'"usage"' not in replay and len(engine.sent) == 1


async def test_a_stream_abandoned_midway_is_closed_and_not_kept() -> None:
    flow, cache = _flow()
    engine = Engine()
    reply = await flow.serve(*_request(kind="completion", stream=True), {}, engine)
    assert reply.stream is not None
    async for _ in reply.stream:
        break
    await reply.stream.aclose()  # type: ignore[attr-defined]
    assert engine.closed == 1 and len(cache.memory) == 0
    again = await flow.serve(*_request(kind="completion"), {}, engine)
    assert again.headers["x-cache-hit"] == "false" and len(engine.sent) == 2


async def test_sampled_requests_and_no_cache_headers_go_to_the_engine() -> None:
    flow, cache = _flow()
    engine = Engine()
    for _ in range(2):
        reply = await flow.serve(*_request(temperature=0.8), {}, engine)
        assert reply.headers["x-cache-hit"] == "false"
    await _read(await flow.serve(*_request(), {}, engine))
    fresh = await flow.serve(*_request(), {"cache-control": "no-cache"}, engine)
    assert fresh.headers["x-cache-hit"] == "false" and len(engine.sent) == 4
    assert cache.metrics.skipped.labels(reason="sampled")._value.get() == 2


async def test_an_engine_error_is_passed_on_and_not_kept() -> None:
    flow, cache = _flow()

    async def failing(parsed: ParsedRequest, raw: bytes) -> Reply:
        return Reply(503, {}, body=b'{"error": {}}')

    reply = await flow.serve(*_request(), {}, failing)
    assert reply.status == 503 and reply.headers["x-cache-hit"] == "false"
    assert len(cache.memory) == 0


def test_a_request_keys_on_the_version_routing_would_pick() -> None:
    v1 = Deployment(model="m", model_path="/a", name="m-v1", traffic_weight=50)
    v2 = Deployment(model="m", model_path="/b", name="m-v2", traffic_weight=50)
    placer = Placer((v1, v2), assign_timeout_s=30)
    ids = Identities(placer, DeploymentBook(), lambda: [_engine("m-v2-0")])
    assert ids.for_request("m", "any session") == ids.of(v2)  # the only live version
    assert ids.of_engine("m-v1-0", "m") == ids.of(v1) != ids.of(v2)
    assert ids.for_request("other", "s") is None
    ids.routable = lambda: [_engine("x-0", model="other")]
    assert ids.for_request("other", "s") == "other"  # no deployment: the served name


def test_the_config_refuses_what_is_not_a_backend() -> None:
    for backend in ("memcached://x", "", "redis://host:notaport/0"):
        with pytest.raises(ConfigError):
            ResponseCacheConfig(backend)
    assert ResponseCacheConfig("redis://:pw@127.0.0.1:7000/2").redis_address == "127.0.0.1:7000/2"


async def test_answers_go_through_redis_to_another_coordinators_cache(
    redis_server: RedisServer,
) -> None:
    cfg = ResponseCacheConfig(redis_server.url)
    writer = ResponseCache(cfg, CollectorRegistry())
    reader = ResponseCache(cfg, CollectorRegistry())
    assert await writer.write("k1", ANSWER.encode())  # what put() queues for its writer task
    assert writer.metrics.stores.labels(layer="redis")._value.get() == 1
    assert await reader.get("k1") == ANSWER
    assert reader.metrics.hits.labels(layer="redis")._value.get() == 1
    assert await reader.get("k1") == ANSWER  # now from its own LRU
    assert reader.metrics.hits.labels(layer="memory")._value.get() == 1
    client = redis.Redis.from_url(redis_server.url)
    assert 0 < client.ttl(PREFIX + "k1") <= 3600
    client.set(PREFIX + "junk", b"not ours")
    assert await reader.get("junk") is None
    assert reader.metrics.errors.labels(op="decode")._value.get() == 1
    client.delete(PREFIX + "k1", PREFIX + "junk")
    client.close()


async def test_a_redis_that_is_down_is_a_miss_counted_once_not_an_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    cache = ResponseCache(ResponseCacheConfig(f"redis://127.0.0.1:{port}/0"), CollectorRegistry())
    assert await cache.get("k") is None
    assert await cache.get("k") is None  # within the backoff: Redis is not asked
    m = cache.metrics
    assert m.errors.labels(op="get")._value.get() == 1 and m.redis_down._value.get() == 1
    assert m.redis_up._value.get() == 0 and m.misses._value.get() == 2
    cache.put("k", ANSWER)  # kept in the LRU all the same
    assert await cache.get("k") == ANSWER
