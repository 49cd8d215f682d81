"""What the other coordinators see of demand, for the leader's autoscaler.

Each coordinator sees only its own requests: those it has in flight on each engine and those
waiting in its admission queue. The leader alone autoscales, so without the followers' share it
would under-scale, and never scale from zero a deployment whose first request reached a follower.
Every coordinator therefore publishes a :class:`Report` about every ``interval_s`` and reads the
others'; :class:`DemandBoard` (sans-I/O) keeps the fresh ones and adds them up. Reports travel
through a folder beside the leader's lock file (coordinators on one machine) or a Redis hash
(``--redis-url``); times are wall-clock seconds, the one clock processes share.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

log = logging.getLogger(__name__)

REDIS_KEY = "fleet:demand"


@dataclass(frozen=True)
class Report:
    """One coordinator's demand at wall-clock time ``at``."""

    coordinator: str
    at: float
    queued: dict[str, int] = field(default_factory=dict)  # served name -> requests waiting
    inflight: dict[str, int] = field(default_factory=dict)  # engine id -> requests in flight

    def encode(self) -> str:
        return json.dumps(
            {"coordinator": self.coordinator, "at": self.at, "queued": self.queued,
             "inflight": self.inflight}, separators=(",", ":"))  # fmt: skip

    @classmethod
    def decode(cls, text: str | bytes) -> Report | None:
        """The report, or None for anything malformed (never raises)."""
        try:
            raw = json.loads(text)
            counts = [raw["queued"], raw["inflight"]]
            if not all(isinstance(c, dict) for c in counts):
                return None
            report = cls(
                coordinator=str(raw["coordinator"]),
                at=float(raw["at"]),
                queued={str(k): int(v) for k, v in counts[0].items()},
                inflight={str(k): int(v) for k, v in counts[1].items()},
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
        return report


class DemandBoard:
    """The latest fresh report of every other coordinator.

    Args:
        me: this coordinator's id (its own reports are ignored).
        max_age_s: a report older than this is a coordinator gone (SIGKILLed, partitioned).
    """

    def __init__(self, me: str, max_age_s: float) -> None:
        self.me = me
        self.max_age_s = max_age_s
        self._reports: dict[str, Report] = {}

    def update(self, reports: Iterable[Report]) -> None:
        """Take what was read: every coordinator's latest report replaces its previous one."""
        self._reports = {r.coordinator: r for r in reports if r.coordinator != self.me}

    def fresh(self, now: float) -> list[Report]:
        return [r for r in self._reports.values() if now - r.at <= self.max_age_s]

    def queued(self, model: str, now: float) -> int:
        """Requests the other coordinators have waiting for ``model``."""
        return sum(r.queued.get(model, 0) for r in self.fresh(now))

    def inflight(self, engine_id: str, now: float) -> int:
        """Requests the other coordinators have in flight on ``engine_id``."""
        return sum(r.inflight.get(engine_id, 0) for r in self.fresh(now))


class Transport(Protocol):
    """Where reports are shared; both calls block (run them in a thread)."""

    def publish(self, report: Report) -> None: ...

    def read(self) -> list[Report]: ...


class FolderTransport:
    """``demand-<coordinator>.json`` files in one folder (coordinators on one machine)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def publish(self, report: Report) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"demand-{report.coordinator}.json"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(report.encode())
        tmp.replace(path)  # a reader never sees half a report

    def read(self) -> list[Report]:
        out = []
        for path in sorted(self.folder.glob("demand-*.json")):
            try:
                report = Report.decode(path.read_bytes())
            except OSError:
                continue  # removed in between
            if report is not None:
                out.append(report)
        return out


class RedisTransport:
    """One field per coordinator in the Redis hash ``fleet:demand``."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def publish(self, report: Report) -> None:
        self.client.hset(REDIS_KEY, report.coordinator, report.encode())

    def read(self) -> list[Report]:
        raw = self.client.hgetall(REDIS_KEY)
        return [r for v in raw.values() if (r := Report.decode(v)) is not None]


async def share_demand(
    transport: Transport,
    board: DemandBoard,
    mine: Callable[[], Report],
    *,
    interval_s: float,
) -> None:
    """Publish this coordinator's report and read the others' every ``interval_s``, forever. A
    transport that fails is logged once per new error and tried again next time."""
    last_error = ""

    def exchange(report: Report) -> list[Report]:
        transport.publish(report)
        return transport.read()

    while True:
        try:
            reports = await trio.to_thread.run_sync(exchange, mine(), abandon_on_cancel=True)
            board.update(reports)
            last_error = ""
        except Exception as exc:  # a folder or Redis gone: the leader sees only its own demand
            if str(exc) != last_error:
                last_error = str(exc)
                log.warning("demand of the other coordinators not shared: %s", exc)
        await trio.sleep(interval_s)


__all__ = [
    "REDIS_KEY",
    "DemandBoard",
    "FolderTransport",
    "RedisTransport",
    "Report",
    "Transport",
    "share_demand",
]
