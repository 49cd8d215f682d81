"""The engines' own load, scraped from their ``/metrics`` (vLLM's names).

Only scorers that read it (load-aware, queue, kv-cache-utilization) make the coordinator scrape:
each engine every ``interval_s``. A value older than ``staleness_s`` is not used (scorers treat
the engine as unknown); a failed scrape marks the engine unhealthy until the next success.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import httpx
import trio

log = logging.getLogger(__name__)

_SAMPLE = re.compile(
    r"^(vllm:num_requests_waiting|vllm:num_requests_running|vllm:kv_cache_usage_perc)"
    r"(?:\{[^}]*\})? ([0-9.eE+-]+|NaN)$",
    re.M,
)


@dataclass(frozen=True)
class EngineStats:
    """One scrape of one engine."""

    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0
    healthy: bool = True
    at: float = 0.0


def parse_vllm_metrics(text: str, at: float) -> EngineStats:
    """The three load figures from a vLLM ``/metrics`` page (summed over label sets)."""
    values = {"waiting": 0.0, "running": 0.0, "kv_usage": 0.0}
    names = {
        "vllm:num_requests_waiting": "waiting",
        "vllm:num_requests_running": "running",
        "vllm:kv_cache_usage_perc": "kv_usage",
    }
    for name, value in _SAMPLE.findall(text):
        if value != "NaN":
            values[names[name]] += float(value)
    return EngineStats(
        waiting=values["waiting"], running=values["running"], kv_usage=values["kv_usage"], at=at
    )


class EngineStatsStore:
    """Latest scrape per engine, and the scraping loop.

    Args:
        interval_s: time between two scrapes of one engine.
        staleness_s: older stats are not used.
    """

    def __init__(self, *, interval_s: float = 0.25, staleness_s: float = 2.0) -> None:
        self.interval_s = interval_s
        self.staleness_s = staleness_s
        self._stats: dict[str, EngineStats] = {}

    def get(self, engine_id: str, now: float) -> EngineStats | None:
        """Fresh stats of an engine, or None (never scraped, or stale)."""
        stats = self._stats.get(engine_id)
        if stats is None:
            return None
        if stats.healthy and now - stats.at > self.staleness_s:
            return None
        return stats

    def put(self, engine_id: str, stats: EngineStats) -> None:
        self._stats[engine_id] = stats

    def forget(self, keep: Iterable[str]) -> None:
        alive = set(keep)
        for engine_id in [e for e in self._stats if e not in alive]:
            del self._stats[engine_id]

    async def run(
        self,
        engines: Callable[[], list[tuple[str, str]]],
        client_for: Callable[[str], httpx.AsyncClient],
    ) -> None:
        """Scrape every (engine id, url) ``engines()`` returns, every ``interval_s``, forever."""
        while True:
            targets = engines()
            self.forget(e for e, _ in targets)
            async with trio.open_nursery() as nursery:
                for engine_id, url in targets:
                    nursery.start_soon(self._scrape, engine_id, url, client_for(url))
            await trio.sleep(self.interval_s)

    async def _scrape(self, engine_id: str, url: str, client: httpx.AsyncClient) -> None:
        now = trio.current_time()
        try:
            with trio.fail_after(max(self.interval_s * 4, 1.0)):
                response = await client.get(url + "/metrics")
            response.raise_for_status()
        except (httpx.HTTPError, trio.TooSlowError) as exc:
            log.debug("scraping %s failed: %s", engine_id, exc)
            self._stats[engine_id] = EngineStats(healthy=False, at=now)
            return
        self._stats[engine_id] = parse_vllm_metrics(response.text, now)


__all__ = ["EngineStats", "EngineStatsStore", "parse_vllm_metrics"]
