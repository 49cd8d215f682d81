"""Fleet-wide limits in Redis (``--redis-url``): shared token buckets and queue counts.

Rate limits: one token bucket per API key, the hash ``fleet:rate:<key name>`` (tokens, and when
they were counted), updated by one Lua script per request: one round trip, atomic, on Redis's
clock (so the coordinators' clocks need not agree). It expires once it would be full again.

Queue bounds: each coordinator writes its own waiters per model to the hash
``fleet:queue:coord:<coordinator id>`` and holds a lease in the sorted set
``fleet:queue:coordinators`` (score: when the lease ends, on Redis's clock). A request about to
wait asks a Lua script, which drops expired leases, sums the other live coordinators' counts
of the model and this coordinator's count with the new waiter, and records the count only if
the sum is within ``max_queue``. Waiters that leave are written back at once (coalesced) and on
every heartbeat, which renews the lease. A coordinator that dies without a word (SIGKILL) stops
renewing: its waiters stop counting when its lease ends (``lease_s``); one restarted under the
same id replaces its counts at its first write. A clean stop removes its counts at once.

Redis down: every decision falls back to this coordinator's share (:class:`LocalLimits`),
counted in ``fleet_shared_limits_fallback_total{limit}``; after a failure Redis is not asked by
requests for ``retry_s`` (the heartbeat keeps probing), and a request never fails because of it.
Redis runs through threads (redis-py's blocking client, one :class:`trio.CapacityLimiter`).

One Redis, or one database of it (``redis://host:6379/N``), per fleet: the keys carry no fleet
name. Redis Cluster is not supported (the queue script reads keys it is not given).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import TYPE_CHECKING, Any

import redis
import trio
from redis.backoff import NoBackoff
from redis.retry import Retry

from fleet.protocol.errors import ConfigError

from .sharedlimits import LocalLimits, QueueLedger, RedisHealth, SharedLimits

if TYPE_CHECKING:
    from .apikeys import ApiKey
    from .config import CoordinatorConfig
    from .metrics import CoordinatorMetrics

log = logging.getLogger(__name__)

PREFIX = "fleet:"

_NOW = """
local function now_ms(given)
  if given and given ~= '' then return tonumber(given) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
"""

#: KEYS[1] the bucket; ARGV: rate (per s), burst, ttl (ms), now (ms; '' for Redis's clock).
#: Returns 0 (a token spent) or the milliseconds until one is there (nothing spent).
BUCKET_LUA = (
    _NOW
    + """
local now = now_ms(ARGV[4])
local rate = tonumber(ARGV[1]) / 1000
local burst = tonumber(ARGV[2])
local held = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = burst
if held[1] then
  tokens = math.min(burst, tonumber(held[1]) + math.max(0, now - tonumber(held[2])) * rate)
end
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) / rate) end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'at',
           string.format('%.17g', now))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return wait
"""
)

#: KEYS[1] the leases, KEYS[2] this coordinator's counts; ARGV: model, this coordinator's
#: count with the new waiter, max_queue, lease (ms), coordinator id, counts-key prefix, now (ms;
#: '' for Redis's clock). Returns 1 (recorded) or 0 (full: nothing written).
RESERVE_LUA = (
    _NOW
    + """
local now = now_ms(ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local total = tonumber(ARGV[2])
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if id ~= ARGV[5] then
    total = total + (tonumber(redis.call('HGET', ARGV[6] .. id, ARGV[1])) or 0)
  end
end
if total > tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], 2 * tonumber(ARGV[4]))
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[5])
return 1
"""
)

#: KEYS[1] the leases, KEYS[2] this coordinator's counts; ARGV: lease (ms), coordinator id,
#: now (ms or ''), then model, count pairs. Renews the lease and replaces the counts.
PUBLISH_LUA = (
    _NOW
    + """
local now = now_ms(ARGV[3])
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('PEXPIRE', KEYS[2], 2 * tonumber(ARGV[1]))
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
return 1
"""
)


def connect(url: str, timeout_s: float) -> redis.Redis:
    """A client for ``url`` that gives up after ``timeout_s`` and never retries by itself (the
    caller falls back instead). Nothing is sent yet.

    Raises:
        ConfigError: ``url`` is not a Redis URL.
    """
    try:
        pool = redis.ConnectionPool.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
    except ValueError as exc:
        raise ConfigError("redis_url", url, f"is not a Redis URL: {exc}") from exc
    return redis.Redis(connection_pool=pool)


class RedisLimits:
    """Rate limits and queue bounds shared through Redis (module docstring).

    Owns a Redis connection pool and, while :meth:`run` runs, the heartbeat; it stops by
    cancellation, removing this coordinator's counts from Redis within ``timeout_s``.

    Args:
        url: ``redis://`` (or ``rediss://``, ``unix://``) URL.
        max_queue: the fleet-wide waiters per model.
        coordinators: how many coordinators share the fleet (the fallback's share).
        coordinator_id: this coordinator's name in Redis (unique in the fleet).
        metrics: where fallbacks and Redis's state are counted.
        lease_s: how long this coordinator's waiters count without a heartbeat.
        heartbeat_s: how often the lease is renewed (well under ``lease_s``).
        timeout_s: the longest a Redis call may take before the local share decides.
        retry_s: after a failure, how long requests use the local share without asking Redis.

    Raises:
        ConfigError: a bad ``url`` or timing.
    """

    def __init__(
        self,
        url: str,
        *,
        max_queue: int,
        coordinators: int,
        coordinator_id: str,
        metrics: CoordinatorMetrics,
        lease_s: float = 5.0,
        heartbeat_s: float = 1.0,
        timeout_s: float = 0.25,
        retry_s: float = 1.0,
    ) -> None:
        if not 0 < heartbeat_s < lease_s:
            raise ConfigError("heartbeat_s", heartbeat_s, f"must be > 0 and < lease_s ({lease_s})")
        self.local = LocalLimits(max_queue, coordinators)
        self.max_queue = max_queue
        self.coordinator_id = coordinator_id
        self.metrics = metrics
        self.lease_ms = math.ceil(lease_s * 1000)
        self.heartbeat_s = heartbeat_s
        self.timeout_s = timeout_s
        self.health = RedisHealth(retry_s)
        self.client = connect(url, timeout_s)
        self._bucket = self.client.register_script(BUCKET_LUA)
        self._reserve = self.client.register_script(RESERVE_LUA)
        self._publish = self.client.register_script(PUBLISH_LUA)
        self._limiter = trio.CapacityLimiter(16)  # the redis library's threads
        # Writes of this coordinator's counts go one at a time, each with the ledger as it is
        # then: a heartbeat's snapshot written after a newer reserve would undercount.
        self._counts_lock = trio.Lock()
        self._dirty = trio.Event()
        self.leases_key = f"{PREFIX}queue:coordinators"
        self.counts_prefix = f"{PREFIX}queue:coord:"
        self.counts_key = self.counts_prefix + coordinator_id
        self.now_ms: str = ""  # tests: a fixed Redis time in ms; "": Redis's clock
        metrics.limits_redis_up.set(1)

    async def _call(self, fn: Any, **kwargs: Any) -> Any:
        return await trio.to_thread.run_sync(functools.partial(fn, **kwargs), limiter=self._limiter)

    def _failed(self, what: str, exc: Exception) -> None:
        if self.health.up:
            log.warning("redis unreachable (%s: %s): enforcing this coordinator's share", what, exc)
        self.health.failed(trio.current_time())
        self.metrics.limits_redis_up.set(0)

    def _ok(self) -> None:
        if not self.health.up:
            log.warning("redis reachable again: limits are fleet-wide again")
        self.health.ok()
        self.metrics.limits_redis_up.set(1)

    async def take(self, key: ApiKey, now: float) -> float:
        """Spend one request of ``key``; 0, or the seconds until one is allowed."""
        rate = key.requests_per_s
        if rate is None:
            return 0.0
        if self.health.usable(now):
            ttl_ms = math.ceil(key.burst / rate * 1000) + 1000
            try:
                wait_ms = await self._call(
                    self._bucket,
                    keys=[f"{PREFIX}rate:{key.name}"],
                    args=[repr(rate), repr(key.burst), ttl_ms, self.now_ms],
                )
            except (redis.RedisError, OSError) as exc:
                self._failed("rate limit", exc)
            else:
                self._ok()
                return int(wait_ms) / 1000
        self.metrics.limits_fallback.labels(limit="rate").inc()
        return self.local.take_now(key, now)

    async def reserve(self, model: str) -> bool:
        """Count one more waiter of ``model`` if the fleet's queue has room; whether it had."""
        ledger = self.local.ledger
        async with self._counts_lock:
            return await self._reserve_locked(ledger, model)

    async def _reserve_locked(self, ledger: QueueLedger, model: str) -> bool:
        count = ledger.add(model)
        try:
            if self.health.usable(trio.current_time()):
                try:
                    recorded = await self._call(
                        self._reserve,
                        keys=[self.leases_key, self.counts_key],
                        args=[
                            model,
                            count,
                            self.max_queue,
                            self.lease_ms,
                            self.coordinator_id,
                            self.counts_prefix,
                            self.now_ms,
                        ],
                    )
                except (redis.RedisError, OSError) as exc:
                    self._failed("queue bound", exc)
                else:
                    self._ok()
                    if not recorded:
                        ledger.remove(model)
                    self._dirty.set()  # other waiters may have come or gone meanwhile
                    return bool(recorded)
            self.metrics.limits_fallback.labels(limit="queue").inc()
            if ledger.fits(model):
                return True
            ledger.remove(model)
            return False
        except BaseException:
            ledger.remove(model)
            raise

    def release(self, model: str) -> None:
        """A waiter counted by :meth:`reserve` left the queue; Redis hears of it soon."""
        self.local.ledger.remove(model)
        self._dirty.set()

    async def publish(self) -> bool:
        """Write this coordinator's counts and renew its lease; whether Redis took them."""
        async with self._counts_lock:
            pairs: list[str | int] = []
            for model, count in self.local.ledger.counts.items():
                pairs += [model, count]
            try:
                await self._call(
                    self._publish,
                    keys=[self.leases_key, self.counts_key],
                    args=[self.lease_ms, self.coordinator_id, self.now_ms, *pairs],
                )
            except (redis.RedisError, OSError) as exc:
                self._failed("heartbeat", exc)
                return False
        self._ok()
        return True

    async def withdraw(self) -> None:
        """Remove this coordinator's counts and lease (a clean stop)."""

        def drop() -> None:
            with self.client.pipeline() as pipe:
                pipe.zrem(self.leases_key, self.coordinator_id)
                pipe.delete(self.counts_key)
                pipe.execute()

        await self._call(drop)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew the lease every ``heartbeat_s`` and write counts when they change, until
        cancelled; then withdraw (shielded, at most ``timeout_s``). Ready at once: Redis being
        down delays nothing."""
        task_status.started()
        try:
            while True:
                with trio.move_on_after(self.heartbeat_s):
                    await self._dirty.wait()
                self._dirty = trio.Event()
                await self.publish()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self.timeout_s * 2):
                try:
                    await self.withdraw()
                except (redis.RedisError, OSError) as exc:
                    log.info("counts not withdrawn from redis (%s): their lease ends them", exc)
            self.client.close()


def limits_for(cfg: CoordinatorConfig, metrics: CoordinatorMetrics) -> SharedLimits:
    """A coordinator's limits: in Redis with ``cfg.redis_url``, else its local share."""
    if cfg.redis_url:
        return RedisLimits(
            cfg.redis_url,
            max_queue=cfg.max_queue,
            coordinators=cfg.coordinators_expected,
            coordinator_id=cfg.coordinator_id,
            metrics=metrics,
        )
    return LocalLimits(cfg.max_queue, cfg.coordinators_expected)


__all__ = ["BUCKET_LUA", "PUBLISH_LUA", "RESERVE_LUA", "RedisLimits", "connect", "limits_for"]
