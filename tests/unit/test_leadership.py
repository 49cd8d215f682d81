"""Leadership among several coordinators (fleet.coordinator.leadership): the sans-I/O core with
plain calls, the ``flock`` backend with real files and a real process that dies."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from fleet.coordinator.leadership import Change, FileLock, Leadership, hold_file_lock


def test_a_new_leader_places_only_after_settling() -> None:
    lead = Leadership(settle_s=2.0)
    assert not lead.may_place(0.0)
    assert lead.observe(False, 1.0) is None  # no change
    assert lead.observe(True, 10.0) == Change(True, 10.0)
    assert lead.leader and not lead.may_place(11.9) and lead.may_place(12.0)
    assert lead.observe(True, 13.0) is None
    assert lead.observe(False, 14.0) == Change(False, 14.0)
    assert not lead.may_place(100.0) and lead.changes == 2


def test_the_only_coordinator_leads_from_the_start() -> None:
    lead = Leadership(settle_s=2.0, leader=True)
    assert lead.may_place(0.0)


def test_one_holder_at_a_time_and_the_lock_says_who(tmp_path: Path) -> None:
    path = tmp_path / "leader.lock"
    a, b = FileLock(path, "coord-a"), FileLock(path, "coord-b")
    assert a.try_acquire() and a.try_acquire()  # held: stays held
    assert not b.try_acquire()  # flock is per open file: one process is enough to show it
    assert path.read_text().startswith("coord-a pid ")
    a.release()
    assert b.try_acquire() and path.read_text().startswith("coord-b pid ")
    b.release()


def test_a_sigkilled_holder_leaves_the_lock_free(tmp_path: Path) -> None:
    path = tmp_path / "leader.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('held', flush=True)\n"
         "time.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        mine = FileLock(path, "coord-b")
        assert not mine.try_acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        assert mine.try_acquire()  # the kernel let go with the process
        mine.release()
    finally:
        holder.kill()
        holder.wait()


async def test_the_follower_takes_over_at_its_next_try(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "leader.lock"
    first, second = Leadership(settle_s=1.0), Leadership(settle_s=1.0)
    changes: list[Change] = []
    leading = trio.CancelScope()
    async with trio.open_nursery() as nursery:

        async def lead(*, task_status: trio.TaskStatus[None]) -> None:
            with leading:
                await hold_file_lock(FileLock(path, "a"), first, retry_s=0.5,
                                     task_status=task_status)  # fmt: skip

        await nursery.start(lead)
        await trio.sleep(0.1)
        assert first.leader
        nursery.start_soon(lambda: hold_file_lock(
            FileLock(path, "b"), second, retry_s=0.5, on_change=changes.append))  # fmt: skip
        await trio.sleep(5.0)
        assert not second.leader  # a holds it
        leading.cancel()  # a stops (drains, or dies: the kernel releases its lock)
        await trio.sleep(0.01)
        assert not first.leader
        await trio.sleep(0.5)
        assert second.leader and [c.leader for c in changes] == [True]
        took_over = changes[0].at
        assert not second.may_place(took_over + 0.9) and second.may_place(took_over + 1.0)
        nursery.cancel_scope.cancel()


def test_bad_leader_settings_name_the_key() -> None:
    from fleet.coordinator.config import CoordinatorConfig
    from fleet.protocol.errors import ConfigError

    with pytest.raises(ConfigError, match="leader_retry_s"):
        CoordinatorConfig(leader_retry_s=0)
    with pytest.raises(ConfigError, match="leader_settle_s"):
        CoordinatorConfig(leader_settle_s=-1)
