"""The model store's state as the agent reports it to the coordinator. Sans-I/O.

:func:`store_state` turns :meth:`ModelStore.models` and :meth:`ModelStore.progress` into the
wire records of ``Register``/``Heartbeat`` (``models``, ``fetches``). :class:`ReportThrottle`
decides when a change of that state is worth a heartbeat of its own: at most one per
``min_interval_s``, and only when something changed, so a download in flight is reported
about twice a second and an idle store never.
"""

from __future__ import annotations

from collections.abc import Iterable

from fleet.protocol.messages import CachedModelInfo, FetchInfo

from .store import CachedModel, FetchProgress

StoreState = tuple[tuple[CachedModelInfo, ...], tuple[FetchInfo, ...]]


def store_state(models: Iterable[CachedModel], fetches: Iterable[FetchProgress]) -> StoreState:
    """The wire form of a store's cached models and fetches (in flight, or failed)."""
    return (
        tuple(
            CachedModelInfo(
                uri=m.uri, size_bytes=m.size_bytes, pinned=bool(m.pinned_by), last_used=m.last_used
            )
            for m in models
        ),
        tuple(
            FetchInfo(
                uri=p.uri,
                state=p.state,
                bytes_done=p.bytes_done,
                bytes_total=p.bytes_total,
                rate_bps=p.rate_bps,
                eta_s=p.eta_s,
                error=p.error,
            )
            for p in fetches
        ),
    )


class ReportThrottle:
    """When to send a heartbeat because the store's state changed.

    Args:
        min_interval_s: the least time between two such heartbeats.
    """

    def __init__(self, *, min_interval_s: float) -> None:
        if not min_interval_s > 0:
            raise ValueError(f"min_interval_s must be > 0, got {min_interval_s!r}")
        self.min_interval_s = min_interval_s
        self._sent: StoreState = ((), ())
        self._sent_at = float("-inf")

    def sent(self, state: StoreState, now: float) -> None:
        """A heartbeat carrying ``state`` went out at ``now`` (periodic ones count too)."""
        self._sent, self._sent_at = state, now

    def due(self, state: StoreState, now: float) -> bool:
        """Whether ``state`` differs from the last one sent and the interval has passed."""
        return state != self._sent and now - self._sent_at >= self.min_interval_s


__all__ = ["ReportThrottle", "StoreState", "store_state"]
