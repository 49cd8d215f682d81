"""Which cached models to evict so a new one fits the disk budget. Sans-I/O.

Candidates are evicted least recently used first; a pinned model (one an engine runs, or is
about to) is never a candidate. The plan is all or nothing: if evicting every unpinned
candidate would still not make room, nothing is evicted and the caller reports why.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Resident:
    """Something in the cache that takes disk space.

    Attributes:
        key: the cache key.
        size_bytes: its size on disk.
        last_used: when an engine last used it (seconds since the epoch; 0 for a leftover
            partial download, which goes first).
        pinned: whether something uses it now.
    """

    key: str
    size_bytes: int
    last_used: float
    pinned: bool = False


@dataclass(frozen=True)
class EvictionPlan:
    """The result of :func:`plan_eviction`.

    Attributes:
        fits: whether the new model fits once ``evict`` is done.
        evict: keys to remove, least recently used first (empty when ``fits`` is False).
        used_bytes: what the cache holds now.
        freeable_bytes: what evicting every unpinned candidate would free.
    """

    fits: bool
    evict: tuple[str, ...]
    used_bytes: int
    freeable_bytes: int


def plan_eviction(
    residents: Iterable[Resident], *, need_bytes: int, budget_bytes: int
) -> EvictionPlan:
    """Choose what to evict so ``need_bytes`` more fit within ``budget_bytes``.

    Args:
        residents: everything that takes space in the cache (entries, partials, reservations).
        need_bytes: the space the new model still needs.
        budget_bytes: the store's disk budget.

    Returns:
        The plan; ``fits`` False (and nothing to evict) when even evicting all would not do.
    """
    items = list(residents)
    used = sum(r.size_bytes for r in items)
    candidates = sorted((r for r in items if not r.pinned), key=lambda r: (r.last_used, r.key))
    freeable = sum(r.size_bytes for r in candidates)
    excess = used + need_bytes - budget_bytes
    if excess <= 0:
        return EvictionPlan(True, (), used, freeable)
    if excess > freeable:
        return EvictionPlan(False, (), used, freeable)
    evict: list[str] = []
    for r in candidates:
        if excess <= 0:
            break
        evict.append(r.key)
        excess -= r.size_bytes
    return EvictionPlan(True, tuple(evict), used, freeable)


__all__ = ["EvictionPlan", "Resident", "plan_eviction"]
