"""Where cached answers live: an in-process LRU, in front of Redis when one is configured
(``--response-cache memory`` or ``--response-cache redis://HOST:PORT/DB``; docs/CACHE.md).

A lookup asks the LRU, then Redis (``GET fleet:resp:<key>``; a Redis hit is copied into the
LRU). A store puts the answer in the LRU at once and queues the Redis write (``SET ... EX
ttl``) for a background task, so no client waits on Redis for a store; a full queue drops the
write (counted). Redis runs through threads (redis-py's blocking client, one
:class:`trio.CapacityLimiter`, ``redis_timeout_s`` per call, no retries of its own).

Redis down: a failed call is a miss (or a store kept only in the LRU), never an error to the
client. It is logged once and counted (``fleet_response_cache_redis_down_total``); requests then
leave Redis alone while a probe PINGs it after a pause that doubles from ``backoff_base_s`` up
to ``backoff_max_s``; the first PING answered puts Redis back in use (logged once).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Info

from fleet.protocol.errors import ConfigError

from .redislimits import connect
from .respcache import Answer, Backoff, LruCache

log = logging.getLogger(__name__)

PREFIX = "fleet:resp:"
WRITE_QUEUE = 1024  # Redis writes waiting; more are dropped


@dataclass(frozen=True)
class ResponseCacheConfig:
    """The response cache's settings.

    Attributes:
        backend: ``"memory"``, or a Redis URL (``redis://``, ``rediss://``, ``unix://``).
        max_entries: answers the in-process LRU holds.
        max_bytes: bytes (keys and answers) the in-process LRU holds.
        ttl_s: how long an answer is served, in the LRU and in Redis.
        redis_timeout_s: the longest one Redis call may take.
        backoff_base_s: the first pause before Redis is asked again after a failure.
        backoff_max_s: the longest pause.

    Raises:
        ConfigError: a bad value (names the key).
    """

    backend: str
    max_entries: int = 10_000
    max_bytes: int = 64 * 1024 * 1024
    ttl_s: float = 3600.0
    redis_timeout_s: float = 0.25
    backoff_base_s: float = 0.5
    backoff_max_s: float = 10.0

    def __post_init__(self) -> None:
        if self.backend != "memory" and not self.backend.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ConfigError(
                "response_cache", self.backend, "must be `memory` or a redis://HOST:PORT/DB URL"
            )
        if self.max_entries < 1:
            raise ConfigError("response_cache_entries", self.max_entries, "must be >= 1")
        if self.max_bytes < 1024:
            raise ConfigError("response_cache_bytes", self.max_bytes, "must be >= 1024")
        for key in ("ttl_s", "redis_timeout_s", "backoff_base_s"):
            value = getattr(self, key)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"response_cache_{key}", value, "must be a number > 0")
        if not self.backoff_max_s >= self.backoff_base_s:
            raise ConfigError("response_cache_backoff_max_s", self.backoff_max_s,
                              f"must be >= backoff_base_s ({self.backoff_base_s})")  # fmt: skip
        if self.redis_url is not None:
            connect(self.redis_url, self.redis_timeout_s).close()  # checks the URL, sends nothing

    @property
    def redis_url(self) -> str | None:
        return None if self.backend == "memory" else self.backend

    @property
    def redis_address(self) -> str:
        """Redis's host:port/db, without credentials ("" for ``memory``)."""
        if self.redis_url is None:
            return ""
        parts = urlsplit(self.redis_url)
        if parts.scheme == "unix":
            return parts.path
        return f"{parts.hostname}:{parts.port or 6379}{parts.path or '/0'}"


class ResponseCacheMetrics:
    """The cache's metrics, in the coordinator's registry (only when the cache is on)."""

    def __init__(self, registry: CollectorRegistry, *, redis: bool) -> None:
        r = registry
        self.info = Info("fleet_response_cache", "The response cache's backend.", registry=r)
        self.hits = Counter("fleet_response_cache_hits_total",
                            "Cacheable requests answered from the cache, by layer (memory, "
                            "redis).", ["layer"], registry=r)  # fmt: skip
        self.misses = Counter("fleet_response_cache_misses_total",
                              "Cacheable requests the cache had no answer for (routed to an "
                              "engine).", registry=r)  # fmt: skip
        self.skipped = Counter("fleet_response_cache_skipped_total",
                               "Requests not cacheable, by reason (sampled, n, logprobs, ...).",
                               ["reason"], registry=r)  # fmt: skip
        self.stores = Counter("fleet_response_cache_stores_total",
                              "Complete answers stored, by layer (memory: the in-process LRU; "
                              "redis: written to Redis).", ["layer"], registry=r)  # fmt: skip
        self.errors = Counter("fleet_response_cache_errors_total",
                              "Cache operations that failed, by operation (get, set, ping: "
                              "Redis; decode: a value not ours; dropped: a Redis write not "
                              "queued).", ["op"], registry=r)  # fmt: skip
        self.redis_down = Counter("fleet_response_cache_redis_down_total",
                                  "Times the cache's Redis was found unreachable.",
                                  registry=r if redis else None)  # fmt: skip
        self.redis_up = Gauge("fleet_response_cache_redis_up",
                              "1 while the cache's Redis answers, 0 while the cache works "
                              "without it (absent without a Redis cache).",
                              registry=r if redis else None)  # fmt: skip
        self.entries = Gauge("fleet_response_cache_entries",
                             "Answers in the in-process LRU.", registry=r)  # fmt: skip
        self.bytes = Gauge("fleet_response_cache_bytes",
                           "Bytes in the in-process LRU.", registry=r)  # fmt: skip
        self.hit_ratio = Gauge("fleet_response_cache_hit_ratio",
                               "hits / (hits + misses) since start.", registry=r)  # fmt: skip
        self._hits = 0
        self._lookups = 0

    def looked_up(self, hit: bool) -> None:
        self._lookups += 1
        self._hits += hit
        self.hit_ratio.set(self._hits / self._lookups)


class ResponseCache:
    """The LRU and, with a Redis backend, the Redis client (module docstring).

    Owns the Redis connection pool and, while :meth:`run` runs, the task that writes to Redis
    and the probe that finds it again after a failure; it stops by cancellation and closes
    the pool.

    Args:
        cfg: the settings.
        registry: where its metrics go.
    """

    def __init__(self, cfg: ResponseCacheConfig, registry: CollectorRegistry) -> None:
        self.cfg = cfg
        self.metrics = ResponseCacheMetrics(registry, redis=cfg.redis_url is not None)
        self.memory = LruCache(cfg.max_entries, cfg.max_bytes, cfg.ttl_s)
        self.backoff = Backoff(cfg.backoff_base_s, cfg.backoff_max_s)
        self.client: redis.Redis | None = None
        if cfg.redis_url is not None:
            self.client = connect(cfg.redis_url, cfg.redis_timeout_s)
            self.metrics.redis_up.set(1)
        backend = "redis" if self.client is not None else "memory"
        self.metrics.info.info({"backend": backend, "redis": cfg.redis_address})
        self._limiter = trio.CapacityLimiter(16)  # the redis library's threads
        self._writes_in, self._writes_out = trio.open_memory_channel[tuple[str, bytes]](WRITE_QUEUE)
        self._down = trio.Event()  # set when Redis fails: the probe starts

    async def get(self, key: str) -> Answer | None:
        """The answer under ``key``, or None (absent, expired, unreadable, Redis down)."""
        now = trio.current_time()
        raw = self.memory.get(key, now)
        layer = "memory"
        if raw is None and self.client is not None and self.backoff.up:
            layer = "redis"
            try:
                raw = await self._call(self.client.get, PREFIX + key)
            except (redis.RedisError, OSError) as exc:
                self._failed("get", exc)
            else:
                self._ok()
                if raw is not None:
                    self.memory.put(key, raw, trio.current_time())
        answer = None
        if raw is not None:
            try:
                answer = Answer.decode(raw)
            except ValueError:
                self.metrics.errors.labels(op="decode").inc()
        if answer is None:
            self.metrics.misses.inc()
        else:
            self.metrics.hits.labels(layer=layer).inc()
        self.metrics.looked_up(answer is not None)
        self._gauges()
        return answer

    def put(self, key: str, answer: Answer) -> None:
        """Keep ``answer`` under ``key``: in the LRU now, in Redis soon."""
        raw = answer.encode()
        self.memory.put(key, raw, trio.current_time())
        self.metrics.stores.labels(layer="memory").inc()
        self._gauges()
        if self.client is not None:
            try:
                self._writes_in.send_nowait((key, raw))
            except trio.WouldBlock:
                self.metrics.errors.labels(op="dropped").inc()

    def _gauges(self) -> None:
        self.metrics.entries.set(len(self.memory))
        self.metrics.bytes.set(self.memory.bytes)

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        call = functools.partial(fn, *args, **kwargs)
        return await trio.to_thread.run_sync(call, limiter=self._limiter)

    def _failed(self, op: str, exc: Exception) -> None:
        self.metrics.errors.labels(op=op).inc()
        if not self.backoff.up and op != "ping":
            return  # a call that started before Redis was found down: the probe's pace holds
        if self.backoff.failed(trio.current_time()):
            log.warning("response cache: redis %s unreachable (%s: %s); serving without it, "
                        "retrying with backoff", self.cfg.redis_address, op, exc)  # fmt: skip
            self.metrics.redis_down.inc()
            self.metrics.redis_up.set(0)
            self._down.set()

    def _ok(self) -> None:
        if self.backoff.ok():
            log.warning("response cache: redis %s reachable again", self.cfg.redis_address)
            self.metrics.redis_up.set(1)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write to Redis and find it again after failures, until cancelled; ready at once
        (Redis being down delays nothing). Returns at once without Redis."""
        if self.client is None:
            task_status.started()
            return
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write)
                nursery.start_soon(self._probe)
                task_status.started()
        finally:
            self.client.close()

    async def _write(self) -> None:
        async for key, raw in self._writes_out:
            if self.backoff.up:  # else kept in the LRU only
                await self.write(key, raw)

    async def write(self, key: str, raw: bytes) -> bool:
        """Write one encoded answer to Redis now (what :meth:`put` queues); whether it took it."""
        assert self.client is not None
        try:
            await self._call(self.client.set, PREFIX + key, raw, ex=math.ceil(self.cfg.ttl_s))
        except (redis.RedisError, OSError) as exc:
            self._failed("set", exc)
            return False
        self._ok()
        self.metrics.stores.labels(layer="redis").inc()
        return True

    async def _probe(self) -> None:
        """While Redis is down: PING it when its backoff allows, until it answers."""
        assert self.client is not None
        while True:
            await self._down.wait()
            self._down = trio.Event()
            while not self.backoff.up:
                await trio.sleep_until(self.backoff.retry_at)
                try:
                    await self._call(self.client.ping)
                except (redis.RedisError, OSError) as exc:
                    self._failed("ping", exc)
                else:
                    self._ok()


__all__ = ["PREFIX", "ResponseCache", "ResponseCacheConfig", "ResponseCacheMetrics"]
