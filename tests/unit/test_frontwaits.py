"""The front server's head waits, ended by one sweep (coordinator/frontwaits.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio
import trio.testing

from fleet.coordinator.frontpolicy import SWEEPS, FrontLimits
from fleet.coordinator.frontwaits import HeadWaits


@dataclass(eq=False)
class Wait:
    until: float
    idle: bool
    ended: float | None = None  # when end_wait was called (trio time), or None
    done: trio.Event = field(default_factory=trio.Event)

    def end_wait(self) -> None:
        self.ended = trio.current_time()
        self.done.set()


@dataclass
class Drain:
    terminated: bool = False


LIMITS = FrontLimits(keep_alive_s=5.0, header_timeout_s=1.0)


async def test_due_waits_end_and_a_termination_ends_only_the_idle_ones() -> None:
    drain = Drain()
    waits = HeadWaits(LIMITS, drain)
    due, later, idle = Wait(10.0, False), Wait(20.0, False), Wait(30.0, True)
    waits.waiting |= {due, later, idle}
    waits.end_due(10.0)
    assert due.ended is not None and (later.ended, idle.ended) == (None, None)
    waits.end_idle()
    assert idle.ended is not None and later.ended is None  # a head under way keeps its time
    drain.terminated, idle.ended = True, None
    waits.end_due(11.0)
    assert idle.ended is not None and later.ended is None


async def test_the_sweep_ends_a_wait_within_a_tenth_of_the_shorter_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    waits = HeadWaits(LIMITS, Drain())
    waits.start()
    waits.start()  # one sweep per event loop
    wait = Wait(trio.current_time() + 3.0, True)
    waits.waiting.add(wait)
    with trio.fail_after(10):  # no sweep: the wait would never end
        await wait.done.wait()
    assert wait.ended is not None
    assert wait.until <= wait.ended <= wait.until + LIMITS.header_timeout_s / SWEEPS
