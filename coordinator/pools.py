"""The coordinator's clients of each engine: an :class:`~.engineclient.EngineClient` for
inference requests and an httpx client for control calls (metric scrapes).

Inference goes through the lean h11 client (its module says why: httpx's pool cost about 38% of
the coordinator's CPU on the request path). Each engine gets its own client, so a pool holds one
engine's connections; the clients of engines that left are closed by :meth:`EnginePools.prune`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import httpx

from .engineclient import EngineClient, Timeouts

# Control calls are few (a scrape per interval): a couple of connections suffice.
CONTROL_LIMITS = httpx.Limits(max_connections=4, max_keepalive_connections=1)


class EnginePools:
    """The clients of each engine, by base URL, created on first use.

    Args:
        timeout: connect, read (each receive), write and pool timeouts; ``None`` parts mean
            none. Control clients use it as it is.
        max_connections: inference connections in use per engine.
        max_keepalive: idle inference connections kept per engine.
        idle_expiry_s: an idle inference connection older than this is closed, not reused
            (under the engines' keep-alive timeout: uvicorn's default is 5 s).
    """

    def __init__(
        self,
        *,
        timeout: httpx.Timeout,
        max_connections: int,
        max_keepalive: int,
        idle_expiry_s: float = 4.0,
    ) -> None:
        self.timeout = timeout
        self.timeouts = Timeouts(
            connect_s=_seconds(timeout.connect),
            read_s=_seconds(timeout.read),
            write_s=_seconds(timeout.write),
            pool_s=_seconds(timeout.pool),
        )
        self.max_connections = max_connections
        self.max_keepalive = max_keepalive
        self.idle_expiry_s = idle_expiry_s
        self._clients: dict[str, EngineClient] = {}
        self._control: dict[str, httpx.AsyncClient] = {}

    def get(self, base_url: str) -> EngineClient:
        """The inference client for one engine.

        Raises:
            EngineURLError: ``base_url`` is not ``http://host:port``.
        """
        client = self._clients.get(base_url)
        if client is None:
            client = self._clients[base_url] = EngineClient(
                base_url,
                timeouts=self.timeouts,
                max_connections=self.max_connections,
                max_idle=self.max_keepalive,
                idle_expiry_s=self.idle_expiry_s,
            )
        return client

    def control(self, base_url: str) -> httpx.AsyncClient:
        """The httpx client for one engine's control calls (``/metrics``)."""
        client = self._control.get(base_url)
        if client is None:
            client = self._control[base_url] = httpx.AsyncClient(
                timeout=self.timeout, limits=CONTROL_LIMITS
            )
        return client

    async def prune(self, live_urls: Iterable[str]) -> None:
        """Close the clients of engines that are gone."""
        live = set(live_urls)
        for url in [u for u in self._clients if u not in live]:
            await self._clients.pop(url).aclose()
        for url in [u for u in self._control if u not in live]:
            await self._control.pop(url).aclose()

    async def aclose(self) -> None:
        """Close every client."""
        await self.prune(())

    def __len__(self) -> int:
        return len(self._clients.keys() | self._control.keys())


def _seconds(value: float | None) -> float:
    return math.inf if value is None else value


__all__ = ["EnginePools"]
