"""The idle connections of one engine as a last-in-first-out stack (sans-I/O).

A request takes the connection used last: a few connections stay hot and the surplus ages out at
the bottom, so taking one is a pop, never a scan (httpcore scans its whole pool on every request
and response).
The stack never closes anything itself: its methods hand back the connections to close, and the
caller closes them (:mod:`.engineclient`).
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class IdleStack(Generic[T]):
    """One engine's idle connections, the one used last on top (sans-I/O: the caller closes
    what the methods hand back).

    Args:
        max_idle: idle connections kept; beyond it the oldest is handed back to close.
        expiry_s: an idle connection older than this is not reused (the engine closes idle
            connections after its keep-alive timeout).
    """

    def __init__(self, max_idle: int, expiry_s: float) -> None:
        if max_idle < 0:
            raise ValueError(f"max_idle must be >= 0, got {max_idle!r}")
        if not expiry_s > 0:
            raise ValueError(f"expiry_s must be > 0 seconds, got {expiry_s!r}")
        self.max_idle = max_idle
        self.expiry_s = expiry_s
        self.closed = False
        self._items: deque[tuple[float, T]] = deque()  # (idle since, connection), oldest first

    def take(self, now: float) -> tuple[T | None, list[T]]:
        """The connection used last, unless it expired; and the expired ones, to close."""
        expired = self._expire(now)
        if self._items:
            return self._items.pop()[1], expired
        return None, expired

    def put(self, conn: T, now: float) -> list[T]:
        """Keep ``conn`` idle; the connections to close (``conn`` itself once closed or when
        nothing is kept, else any expired or over ``max_idle``, oldest first)."""
        if self.closed or self.max_idle == 0:
            return [conn]
        out = self._expire(now)
        self._items.append((now, conn))
        while len(self._items) > self.max_idle:
            out.append(self._items.popleft()[1])
        return out

    def close(self) -> list[T]:
        """Keep nothing from now on; every idle connection, to close."""
        self.closed = True
        out = [conn for _, conn in self._items]
        self._items.clear()
        return out

    def _expire(self, now: float) -> list[T]:
        out: list[T] = []
        while self._items and now - self._items[0][0] >= self.expiry_s:
            out.append(self._items.popleft()[1])
        return out

    def __len__(self) -> int:
        return len(self._items)


__all__ = ["IdleStack"]
