"""The proxy's socket reads and writes (fleet.coordinator.sockio): whole writes need no wait, yet
a task that only ever writes at once still lets the others run."""

from __future__ import annotations

import trio
import trio.lowlevel

from fleet.coordinator import sockio


async def test_writes_that_never_wait_still_yield_to_other_tasks() -> None:
    a, b = trio.socket.socketpair()
    ran = 0

    async def other() -> None:
        nonlocal ran
        while True:
            ran += 1
            await trio.lowlevel.checkpoint()

    with a, b:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            await trio.lowlevel.checkpoint()
            before = ran
            for _ in range(4 * sockio.YIELD_EVERY):  # 4 KiB in all: the buffer takes it
                await sockio.send_all(a, b"x" * 16)
            assert ran - before >= 3  # the other task ran between the writes
            nursery.cancel_scope.cancel()
        assert await sockio.receive(b, wait_first=True) == b"x" * 16 * 4 * sockio.YIELD_EVERY


async def test_a_read_waits_for_bytes_and_sees_the_end() -> None:
    a, b = trio.socket.socketpair()
    with a, b:
        assert sockio.read_ready(b) is None  # nothing yet, and no wait
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sockio.send_all, a, b"hello")
            assert await sockio.receive(b, wait_first=True) == b"hello"
        a.shutdown(trio.socket.SHUT_WR)
        assert await sockio.receive(b, wait_first=False) == b""
