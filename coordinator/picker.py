"""The first endpoint picker: least in-flight requests, ties broken at random.

Sans-I/O. The coordinator counts its own in-flight requests per engine (:class:`InflightCounter`);
the KV-cache-aware pipeline of filters, scorers and pickers replaces :func:`pick_least_loaded`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from .registry import EngineView


class InflightCounter:
    """Requests the coordinator has sent to each engine and not yet finished."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def get(self, engine_id: str) -> int:
        return self._counts.get(engine_id, 0)

    def acquire(self, engine_id: str) -> None:
        self._counts[engine_id] = self._counts.get(engine_id, 0) + 1

    def release(self, engine_id: str) -> None:
        n = self._counts.get(engine_id, 0) - 1
        if n > 0:
            self._counts[engine_id] = n
        else:
            self._counts.pop(engine_id, None)


def pick_least_loaded(
    candidates: Sequence[EngineView], inflight: InflightCounter, rng: random.Random
) -> EngineView | None:
    """Return the candidate with the fewest in-flight requests (random among equals)."""
    if not candidates:
        return None
    least = min(inflight.get(e.id) for e in candidates)
    return rng.choice([e for e in candidates if inflight.get(e.id) == least])


__all__ = ["InflightCounter", "pick_least_loaded"]
