"""One httpx connection pool per engine.

httpcore's pool scans its connection list once per connection on every request and response
(``_assign_requests_to_connections``: quadratic in the connections it holds), so a single pool in
front of a whole fleet slows down as concurrency grows: profiled at 64 concurrent requests over 2
engines, that scan was the largest cost in the coordinator. A pool per engine keeps each list to
that engine's connections. Pools of engines that left are closed by :meth:`EnginePools.prune`.
"""

from __future__ import annotations

from collections.abc import Iterable

import httpx


class EnginePools:
    """``httpx.AsyncClient`` per engine base URL, created on first use.

    Args:
        timeout: applied to every request.
        max_connections: per engine.
        max_keepalive: idle connections kept per engine.
    """

    def __init__(self, *, timeout: httpx.Timeout, max_connections: int, max_keepalive: int) -> None:
        self.timeout = timeout
        self.limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_keepalive
        )
        self._clients: dict[str, httpx.AsyncClient] = {}

    def get(self, base_url: str) -> httpx.AsyncClient:
        """The client for one engine."""
        client = self._clients.get(base_url)
        if client is None:
            client = self._clients[base_url] = httpx.AsyncClient(
                timeout=self.timeout, limits=self.limits
            )
        return client

    async def prune(self, live_urls: Iterable[str]) -> None:
        """Close the pools of engines that are gone."""
        live = set(live_urls)
        for url in [u for u in self._clients if u not in live]:
            await self._clients.pop(url).aclose()

    async def aclose(self) -> None:
        """Close every pool."""
        await self.prune(())

    def __len__(self) -> int:
        return len(self._clients)


__all__ = ["EnginePools"]
