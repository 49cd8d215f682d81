"""``response-cache-redis-down``'s parts (chaos/cacheredis.py) and the load's repeated
deterministic questions (chaos/load.py); the Redis is a real redis-server."""

from __future__ import annotations

import pytest

from fleet.chaos.cacheredis import cache_backend, redis_pid
from fleet.chaos.errors import ChaosError
from fleet.chaos.load import LoadSpec, plan
from fleet.protocol.errors import ConfigError

from ..redisserver import RedisServer


def test_distinct_questions_repeat_with_their_endpoint_and_vary_their_streaming() -> None:
    spec = LoadSpec(model="m", distinct=3, temperature=0.0)
    first = [plan(spec, i) for i in range(3)]
    again = [plan(spec, i) for i in range(3, 300, 3)]
    assert all(p.body["temperature"] == 0.0 for p in first)
    assert len({str(p.body.get("messages") or p.body.get("prompt")) for p in first}) == 3
    for p in again:
        assert p.path == first[0].path
        assert p.body.get("messages", p.body.get("prompt")) == first[0].body.get(
            "messages", first[0].body.get("prompt")
        )
    assert {p.stream for p in again} == {True, False}
    assert "temperature" not in plan(LoadSpec(model="m"), 0).body  # unchanged by default
    with pytest.raises(ConfigError):
        LoadSpec(model="m", distinct=-1)


def test_the_fleets_cache_is_read_from_its_info_metric() -> None:
    metrics = [("fleet_response_cache_info", {"backend": "redis", "redis": "127.0.0.1:1/0"}, 1.0)]
    assert cache_backend(metrics) == ("redis", "127.0.0.1:1/0")
    assert cache_backend([("fleet_requests_total", {}, 3.0)]) == ("", "")


def test_the_redis_server_is_found_by_its_port(redis_server: RedisServer) -> None:
    assert redis_server.proc is not None
    assert redis_pid(redis_server.port) == redis_server.proc.pid
    with pytest.raises(ChaosError, match="no redis-server"):
        redis_pid(1)
