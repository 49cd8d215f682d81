"""Leadership through a Kubernetes ``coordination.k8s.io/v1`` Lease: the decisions, apart from
the API calls.

client-go's leader election, as a sans-I/O core. :meth:`LeaseElector.step` takes what the Lease
looked like when just read (:class:`Lease`, or None when there is none) and ``now`` (this
process's monotonic clock), and says what to write: create the Lease, take it over, renew it,
or nothing. The caller writes it with the read's ``resourceVersion`` (so that of two candidates
writing at once, the API server takes one and answers the other 409) and reports the outcome
with :meth:`LeaseElector.wrote`.

* A Lease held by another is taken over only after it did not change for its
  ``leaseDurationSeconds`` **as this process observed it** (the holder's ``renewTime`` comes from
  another clock, and is not compared with ours).
* The holder renews every retry; it stops leading when no renew succeeded for
  ``renew_deadline_s`` (shorter than the lease duration, so it gives up before anyone may take
  over: never two leaders).
* Stepping down (:meth:`LeaseElector.release`) writes an expired lease, so a successor need not
  wait out the duration.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fleet.protocol.errors import ConfigError


@dataclass(frozen=True)
class Lease:
    """A Lease's spec as read, and its ``metadata.resourceVersion`` ("" for one to create)."""

    holder: str
    duration_s: int
    transitions: int = 0
    renewed: str = ""  # renewTime as the holder wrote it (opaque here: another clock)
    resource_version: str = ""


@dataclass(frozen=True)
class Write:
    """Write ``lease`` (create it when ``create``); ``takeover``: it changes hands."""

    lease: Lease
    create: bool = False
    takeover: bool = False


class LeaseElector:
    """One candidate's side of a Lease election (see the module docstring).

    Args:
        identity: this candidate's holder identity (unique among candidates).
        lease_duration_s: how long a silent holder keeps the Lease.
        renew_deadline_s: a leader that could not renew this long steps down.

    Raises:
        ConfigError: a deadline not shorter than the duration, or a value out of range.
    """

    def __init__(
        self, identity: str, *, lease_duration_s: int = 15, renew_deadline_s: float = 10.0
    ):
        if not identity:
            raise ConfigError("identity", identity, "must not be empty")
        if lease_duration_s < 1:
            raise ConfigError("lease_duration_s", lease_duration_s, "must be >= 1")
        if not 0 < renew_deadline_s < lease_duration_s:
            raise ConfigError(
                "renew_deadline_s", renew_deadline_s, f"must be > 0 and < {lease_duration_s}"
            )
        self.identity = identity
        self.lease_duration_s = lease_duration_s
        self.renew_deadline_s = renew_deadline_s
        self._seen: Lease | None = None  # the other holder's lease as last observed
        self._seen_at = 0.0  # when it last changed, on our clock
        self._renewed_at: float | None = None  # our last successful write, while we hold it

    def leader(self, now: float) -> bool:
        """Whether this candidate leads: it holds the Lease, renewed within the deadline."""
        return self._renewed_at is not None and now - self._renewed_at < self.renew_deadline_s

    def step(self, current: Lease | None, now: float, stamp: str) -> Write | None:
        """What to write after reading ``current`` (None: no Lease); ``stamp``: the renew time
        to write (the caller's wall clock, as the API wants it)."""
        if not self.leader(now):
            self._renewed_at = None
        if current is None:
            return Write(Lease(self.identity, self.lease_duration_s, 0, stamp), create=True)
        if current.holder == self.identity:
            return Write(replace(current, renewed=stamp, duration_s=self.lease_duration_s))
        if current != self._seen:
            self._seen, self._seen_at = current, now
        expired = not current.holder or now - self._seen_at >= current.duration_s
        if not expired:
            return None
        taken = Lease(self.identity, self.lease_duration_s, current.transitions + 1, stamp,
                      current.resource_version)  # fmt: skip
        return Write(taken, takeover=True)

    def wrote(self, write: Write, ok: bool, now: float) -> None:
        """The outcome of writing ``write`` (False: a conflict, or the API could not be
        reached)."""
        if ok:
            self._renewed_at = now
            self._seen = None

    def release(self, current: Lease) -> Write | None:
        """The write that hands the Lease back (an empty holder), if this candidate holds it."""
        if current.holder != self.identity:
            return None
        self._renewed_at = None
        return Write(replace(current, holder="", renewed=""))


__all__ = ["Lease", "LeaseElector", "Write"]
