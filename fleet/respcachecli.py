"""The response cache's flags of ``fleet up`` and ``fleet coordinator`` (docs/CACHE.md)."""

from __future__ import annotations

import argparse
from typing import Any


def add_response_cache_args(p: argparse.ArgumentParser) -> None:
    """``--response-cache`` and its bounds."""
    p.add_argument(
        "--response-cache",
        default=None,
        metavar="memory|redis://HOST:PORT/DB",
        help="answer repeated deterministic requests (temperature 0 or a seed) from a cache: "
        "`memory` (in-process LRU) or a Redis URL (LRU in front of Redis); default: off",
    )
    p.add_argument(
        "--response-cache-entries",
        type=int,
        default=10_000,
        metavar="N",
        help="answers the in-process LRU holds (default %(default)s)",
    )
    p.add_argument(
        "--response-cache-bytes",
        type=int,
        default=64 * 1024 * 1024,
        metavar="BYTES",
        help="bytes the in-process LRU holds (default %(default)s)",
    )
    p.add_argument(
        "--response-cache-ttl",
        type=float,
        default=3600.0,
        metavar="S",
        help="how long a cached answer is served, in the LRU and in Redis (default %(default)s)",
    )


def response_cache_config(args: argparse.Namespace) -> Any:
    """The cache's settings from the flags (a ResponseCacheConfig), or None when off.

    Raises:
        ConfigError: a bad value (names the flag's key).
    """
    if not args.response_cache:
        return None
    from fleet.coordinator.respcachestore import ResponseCacheConfig

    return ResponseCacheConfig(
        backend=args.response_cache,
        max_entries=args.response_cache_entries,
        max_bytes=args.response_cache_bytes,
        ttl_s=args.response_cache_ttl,
    )


__all__ = ["add_response_cache_args", "response_cache_config"]
