"""The other coordinators' demand, for the leader's autoscaler (coordinator/demandboard.py):
the board's sums and ages in plain calls, and both transports for real (a folder, a Redis)."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path

import redis
import trio

from fleet.coordinator.demandboard import (
    REDIS_KEY,
    DemandBoard,
    FolderTransport,
    RedisTransport,
    Report,
    share_demand,
)

from ..redisserver import RedisServer


def report(who: str, at: float, **queued: int) -> Report:
    return Report(who, at, queued=dict(queued), inflight={f"{who}-engine": 2, "shared-0": 1})


def test_the_board_adds_the_fresh_reports_of_the_others() -> None:
    board = DemandBoard("me", max_age_s=3.0)
    board.update([report("me", 100.0, chat=9), report("a", 100.0, chat=2), report("b", 98.0,
                 chat=3, other=1)])  # fmt: skip
    assert board.queued("chat", now=100.5) == 5  # its own is not counted twice
    assert board.queued("other", now=100.5) == 1 and board.queued("none", now=100.5) == 0
    assert board.inflight("shared-0", now=100.5) == 2
    assert board.queued("chat", now=101.5) == 2  # b's report is 3.5 s old: b is gone
    board.update([report("a", 105.0)])
    assert board.queued("chat", now=105.0) == 0  # a's new report replaced its old one


def test_reports_round_trip_and_malformed_ones_are_dropped() -> None:
    r = report("coord-1", 1234.5, chat=3)
    assert Report.decode(r.encode()) == r
    for bad in (b"", b"{", b"[]", b'{"coordinator": "x"}', b'{"coordinator": "x", "at": "t",'
                b' "queued": {}, "inflight": {}}', b'{"coordinator": "x", "at": 1, "queued": [],'
                b' "inflight": {}}'):  # fmt: skip
        assert Report.decode(bad) is None


def test_the_folder_transport_shares_reports_between_processes(tmp_path: Path) -> None:
    a, b = FolderTransport(tmp_path / "d"), FolderTransport(tmp_path / "d")
    a.publish(report("a", 1.0, chat=1))
    b.publish(report("b", 2.0, chat=2))
    a.publish(report("a", 3.0, chat=4))  # replaces a's first
    (tmp_path / "d" / "demand-junk.json").write_text("not json")
    assert sorted((r.coordinator, r.at) for r in b.read()) == [("a", 3.0), ("b", 2.0)]


def test_the_redis_transport_shares_reports(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    client.delete(REDIS_KEY)
    a, b = RedisTransport(client), RedisTransport(client)
    a.publish(report("a", 1.0, chat=1))
    b.publish(report("b", 2.0, chat=2))
    client.hset(REDIS_KEY, "junk", "{")
    assert sorted((r.coordinator, r.queued["chat"]) for r in a.read()) == [("a", 1), ("b", 2)]
    client.delete(REDIS_KEY)


async def test_sharing_survives_a_failing_transport(tmp_path: Path) -> None:
    class Flaky(FolderTransport):
        calls = 0

        def publish(self, r: Report) -> None:
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise OSError("disk gone")
            super().publish(r)

    class Board(DemandBoard):
        seen = trio.Event()

        def update(self, reports: Iterable[Report]) -> None:
            super().update(reports)
            self.seen.set()

    FolderTransport(tmp_path).publish(report("other", 1e12, chat=7))
    board = Board("me", max_age_s=1e13)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            mine = functools.partial(report, "me", 1e12)
            nursery.start_soon(functools.partial(share_demand, Flaky(tmp_path), board, mine,
                                                 interval_s=0.01))  # fmt: skip
            await board.seen.wait()  # after the first exchange failed, the second got through
            nursery.cancel_scope.cancel()
    assert Flaky.calls >= 2 and board.queued("chat", 1e12) == 7
    names = await trio.to_thread.run_sync(lambda: {p.name for p in tmp_path.iterdir()})
    assert names == {"demand-other.json", "demand-me.json"}
