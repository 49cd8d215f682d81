"""Which deployment (version) of a served name a new session goes to: weighted and sticky.

Sans-I/O. A session key (the ``x-session-id`` header, or a request id for a request without one)
is hashed (BLAKE2b, 64 bits) to a point in [0, 1). The versions serving the name, ordered by
deployment name, cover [0, 1) in consecutive intervals as wide as their share of the total
``trafficWeight``; the session goes to the version whose interval holds its point. So:

* the same key always picks the same version while the versions and weights stay the same
  (sticky, and the same on every coordinator replica: nothing is stored);
* over many keys the split follows the weights (90/10 gives 90 % / 10 % of sessions);
* changing weights moves only the sessions whose point lies where the intervals changed (going
  from 90/10 to 80/20 moves one session in ten, all of them from the first version to the
  second).

Callers pass only the versions that can take traffic now (at least one ready engine), so a
version with no ready engine gets no new sessions and the others share its part.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol, TypeVar

from .deployspec import FleetModel


class Weighted(Protocol):
    """A deployment as traffic splitting sees it (a FleetModel, a placement Deployment)."""

    @property
    def name(self) -> str: ...

    @property
    def traffic_weight(self) -> int: ...


W = TypeVar("W", bound=Weighted)


def session_point(session_key: str) -> float:
    """The session's point in [0, 1), from BLAKE2b of its key."""
    digest = hashlib.blake2b(session_key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def serving(models: Sequence[FleetModel], served_name: str) -> list[FleetModel]:
    """The deployments that serve ``served_name``, ordered by deployment name."""
    return sorted((m for m in models if served_name in m.served_model_names), key=lambda m: m.name)


def traffic_shares(versions: Sequence[Weighted]) -> dict[str, float]:
    """Each deployment's share of new sessions (0..1), by name; all 0 when every weight is 0."""
    total = sum(m.traffic_weight for m in versions)
    return {m.name: (m.traffic_weight / total if total else 0.0) for m in versions}


def pick_version(versions: Sequence[W], session_key: str) -> W | None:
    """Pick the deployment a new session goes to.

    Args:
        versions: the deployments serving one name that can take traffic now (any order).
        session_key: the ``x-session-id``, or a request id when the request has none.

    Returns:
        The deployment; None when there is none, or every weight is 0.
    """
    ordered = sorted(versions, key=lambda m: m.name)
    total = sum(m.traffic_weight for m in ordered)
    if total <= 0:
        return None
    target = session_point(session_key) * total
    edge = 0
    for m in ordered:
        edge += m.traffic_weight
        if target < edge:
            return m
    return next(m for m in reversed(ordered) if m.traffic_weight > 0)  # float rounding at 1.0


__all__ = ["Weighted", "pick_version", "serving", "session_point", "traffic_shares"]
