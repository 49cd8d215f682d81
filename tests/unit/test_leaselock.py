"""Lease-based leader election's decisions (fleet.coordinator.leaselock): plain calls with an
explicit ``now``, the API server played by a dict with resourceVersions."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fleet.coordinator.leaselock import Lease, LeaseElector, Write
from fleet.protocol.errors import ConfigError


class Server:
    """One Lease with optimistic concurrency, as the API server keeps it."""

    def __init__(self) -> None:
        self.lease: Lease | None = None
        self.version = 0

    def read(self) -> Lease | None:
        return self.lease

    def write(self, w: Write) -> bool:
        if w.create != (self.lease is None):
            return False  # AlreadyExists / NotFound
        if self.lease is not None and w.lease.resource_version != self.lease.resource_version:
            return False  # 409: written since it was read
        self.version += 1
        self.lease = replace(w.lease, resource_version=str(self.version))
        return True


def turn(elector: LeaseElector, server: Server, now: float) -> bool:
    """One retry: read, decide, write; whether it leads afterwards."""
    write = elector.step(server.read(), now, stamp=f"t{now}")
    if write is not None:
        elector.wrote(write, server.write(write), now)
    return elector.leader(now)


def test_the_first_candidate_creates_the_lease_and_renews_it() -> None:
    server, a = Server(), LeaseElector("a", lease_duration_s=15, renew_deadline_s=10)
    assert not a.leader(0.0)
    assert turn(a, server, 0.0) and server.lease is not None
    assert (server.lease.holder, server.lease.transitions) == ("a", 0)
    assert turn(a, server, 2.0) and server.lease.renewed == "t2.0"


def test_a_second_candidate_waits_for_the_lease_to_lapse_on_its_own_clock() -> None:
    server = Server()
    a = LeaseElector("a", lease_duration_s=15, renew_deadline_s=10)
    b = LeaseElector("b", lease_duration_s=15, renew_deadline_s=10)
    t = 0.0
    while t <= 30:  # a renews every 2 s: b never takes over
        assert turn(a, server, t)
        assert not turn(b, server, t + 1)
        t += 2
    # a stops (killed) after its renew at 30: b first saw that lease at 31, and takes it over
    # once it stayed unchanged for the lease's 15 s on b's own clock
    assert t == 32
    assert not turn(b, server, 33.0)
    assert not turn(b, server, 45.9)
    assert turn(b, server, 46.0)
    assert server.lease is not None and (server.lease.holder, server.lease.transitions) == ("b", 1)


def test_of_two_takeovers_at_once_the_api_server_keeps_one() -> None:
    server = Server()
    a = LeaseElector("a", lease_duration_s=5, renew_deadline_s=3)
    turn(a, server, 0.0)
    b = LeaseElector("b", lease_duration_s=5, renew_deadline_s=3)
    c = LeaseElector("c", lease_duration_s=5, renew_deadline_s=3)
    for e in (b, c):
        assert e.step(server.read(), 1.0, "t1") is None
    wb = b.step(server.read(), 7.0, "t7")
    wc = c.step(server.read(), 7.0, "t7")  # both read the same lease
    assert wb is not None and wc is not None and wb.takeover and wc.takeover
    b.wrote(wb, server.write(wb), 7.0)
    c.wrote(wc, server.write(wc), 7.0)  # 409
    assert b.leader(7.0) and not c.leader(7.0)


def test_a_leader_that_cannot_renew_steps_down_before_anyone_may_take_over() -> None:
    server = Server()
    a = LeaseElector("a", lease_duration_s=15, renew_deadline_s=10)
    assert turn(a, server, 0.0)
    # the API is unreachable for a: its writes fail
    for now in (2.0, 4.0, 9.9):
        write = a.step(server.read(), now, "x")
        assert write is not None
        a.wrote(write, False, now)
    assert a.leader(9.9) and not a.leader(10.0)  # 10 s after the last renew
    b = LeaseElector("b", lease_duration_s=15, renew_deadline_s=10)
    assert not turn(b, server, 10.0)  # b only now starts counting the lease's 15 s


def test_releasing_hands_the_lease_over_at_once() -> None:
    server = Server()
    a = LeaseElector("a", lease_duration_s=15, renew_deadline_s=10)
    b = LeaseElector("b", lease_duration_s=15, renew_deadline_s=10)
    turn(a, server, 0.0)
    assert not turn(b, server, 1.0)
    assert server.lease is not None
    release = a.release(server.lease)
    assert release is not None and server.write(release) and not a.leader(2.0)
    assert turn(b, server, 2.0)  # an empty holder is free now
    assert a.release(server.lease) is None  # not a's to give


def test_bad_settings_name_the_key() -> None:
    with pytest.raises(ConfigError, match="renew_deadline_s"):
        LeaseElector("a", lease_duration_s=10, renew_deadline_s=10)
    with pytest.raises(ConfigError, match="identity"):
        LeaseElector("")
