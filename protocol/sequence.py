"""Where one engine's KV-event batch falls in its sequence: next, duplicate, restart or gap.

Sans-I/O, shared by the agent's relay (``agent/kvrelay.py``: it repairs a gap from the engine's
replay socket before forwarding) and the coordinator's index (``coordinator/kvindex.py``: it
holds batches behind a gap until the missing ones come, within a reorder window and a gap
timeout). :meth:`SequenceTracker.classify` decides, against ``next_seq`` (the number expected
next):

- before any batch, in a tracker without a first number (a coordinator joining an engine that
  already runs): ``NEXT``, whatever the number: the first batch seen sets the sequence;
- ``seq == 0`` after others: ``RESTART`` (an engine numbers its batches from 0);
- ``seq < next_seq``, or a number already held: ``DUPLICATE``;
- ``seq > next_seq``: ``GAP``, with the missing numbers ``next_seq .. seq - 1``;
- ``seq == next_seq``: ``NEXT``.

Classifying changes nothing; the caller says what it did with the batch (:meth:`advance`,
:meth:`hold`, :meth:`expect`, :meth:`load`).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Order(enum.Enum):
    """Where a batch falls in its engine's sequence."""

    NEXT = "next"
    DUPLICATE = "duplicate"
    RESTART = "restart"
    GAP = "gap"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What :meth:`SequenceTracker.classify` found for batch ``seq``.

    ``missing`` is the range of numbers lost before it: empty unless ``order`` is ``GAP``.
    """

    order: Order
    seq: int
    missing: range = range(0)


class SequenceTracker(Generic[T]):
    """One engine's position in its batch sequence, and the batches held behind a gap.

    Args:
        first: the number expected first (an engine starts at 0), or None: the first batch
            seen sets the sequence.
        reorder_window: the most batches held behind a gap before :attr:`overflowing`.
        gap_timeout_s: how long a gap may stay open before :meth:`overdue` (> 0).

    Raises:
        ConfigError: ``first`` or ``reorder_window`` is negative, or ``gap_timeout_s`` is not
            a number > 0.
    """

    def __init__(
        self, *, first: int | None = 0, reorder_window: int = 0, gap_timeout_s: float = math.inf
    ) -> None:
        if first is not None and first < 0:
            raise ConfigError("first", first, "must be >= 0 or None")
        if reorder_window < 0:
            raise ConfigError("reorder_window", reorder_window, "must be >= 0")
        if not gap_timeout_s > 0:
            raise ConfigError("gap_timeout_s", gap_timeout_s, "must be > 0")
        self.reorder_window = reorder_window
        self.gap_timeout_s = gap_timeout_s
        self.next_seq = first or 0
        self.started = first is not None  # next_seq is meaningful
        self.held: dict[int, T] = {}  # seq -> batch, behind a gap
        self.gap_since: float | None = None  # when the oldest open gap opened

    def classify(self, seq: int) -> Verdict:
        """Where batch ``seq`` falls; changes nothing."""
        if not self.started:
            return Verdict(Order.NEXT, seq)
        if seq == 0 and self.next_seq > 0:
            return Verdict(Order.RESTART, seq)
        if seq < self.next_seq or seq in self.held:
            return Verdict(Order.DUPLICATE, seq)
        if seq > self.next_seq:
            return Verdict(Order.GAP, seq, range(self.next_seq, seq))
        return Verdict(Order.NEXT, seq)

    def advance(self, seq: int) -> None:
        """Batch ``seq`` was applied (or forwarded): ``seq + 1`` is expected next."""
        self.started = True
        self.next_seq = seq + 1

    def expect(self, seq: int) -> None:
        """Continue from ``seq`` (a resync or a restart): held batches before it are dropped,
        those from it on stay, and the gap clock stops."""
        self.next_seq = seq
        self.held = {s: b for s, b in self.held.items() if s >= seq}
        self.gap_since = None

    def restart(self) -> None:
        """The engine restarted: its new process numbers from 0, and the batches held from
        the old one are dropped (its numbers will come again, meaning other batches)."""
        self.next_seq = 0
        self.started = True
        self.held = {}
        self.gap_since = None

    def load(self, seq: int) -> None:
        """A snapshot as of batch ``seq`` (-1: before any) replaces what came before: batches
        after it continue it, and the sequence is started only if ``seq >= 0``."""
        self.held = {s: b for s, b in self.held.items() if s > seq}
        self.next_seq = seq + 1
        self.started = seq >= 0
        self.gap_since = None

    def hold(self, seq: int, batch: T, now: float) -> None:
        """Keep batch ``seq`` (classified ``GAP``) until the numbers before it come; the first
        batch held starts the gap clock at ``now``."""
        if not self.held:
            self.gap_since = now
        self.held[seq] = batch

    @property
    def overflowing(self) -> bool:
        """More batches are held than the reorder window allows."""
        return len(self.held) > self.reorder_window

    def overdue(self, now: float) -> bool:
        """A gap has stayed open for ``gap_timeout_s`` or longer."""
        return (
            bool(self.held)
            and self.gap_since is not None
            and (now - self.gap_since >= self.gap_timeout_s)
        )

    def oldest_held(self) -> int:
        """The lowest number held (where a resync continues from).

        Raises:
            ValueError: nothing is held.
        """
        if not self.held:
            raise ValueError("no batch is held")
        return min(self.held)

    def take_ready(self) -> list[tuple[int, T]]:
        """Remove and return, in order, the held batches that now follow without a gap,
        advancing past each; the gap clock stops once nothing is held."""
        ready = []
        while self.next_seq in self.held:
            seq = self.next_seq
            ready.append((seq, self.held.pop(seq)))
            self.advance(seq)
        if not self.held:
            self.gap_since = None
        return ready


__all__ = ["Order", "SequenceTracker", "Verdict"]
