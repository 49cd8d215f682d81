"""The coordinator's own count of in-flight requests per engine (``active-request-scorer``).

Sans-I/O.
"""

from __future__ import annotations


class InflightCounter:
    """Requests the coordinator has sent to each engine and not yet finished."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def get(self, engine_id: str) -> int:
        return self._counts.get(engine_id, 0)

    def counts(self) -> dict[str, int]:
        """Every engine with requests in flight, and how many."""
        return dict(self._counts)

    def acquire(self, engine_id: str) -> None:
        self._counts[engine_id] = self._counts.get(engine_id, 0) + 1

    def release(self, engine_id: str) -> None:
        n = self._counts.get(engine_id, 0) - 1
        if n > 0:
            self._counts[engine_id] = n
        else:
            self._counts.pop(engine_id, None)


__all__ = ["InflightCounter"]
