"""One engine's KV batch sequence (fleet.protocol.sequence), in plain calls.

The rules the agent's relay and the coordinator's index share: next, duplicate, restart, gap;
and the index's side of it, batches held behind a gap with a reorder window and a gap timeout.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from fleet.protocol.errors import ConfigError
from fleet.protocol.sequence import Order, SequenceTracker, Verdict


def test_an_engine_tracker_expects_zero_first_then_each_next_number() -> None:
    seqs: SequenceTracker[None] = SequenceTracker()
    assert seqs.started and seqs.next_seq == 0
    assert seqs.classify(0) == Verdict(Order.NEXT, 0)
    seqs.advance(0)
    assert seqs.classify(1) == Verdict(Order.NEXT, 1)
    assert seqs.classify(1).missing == range(0)


def test_a_number_past_the_next_is_a_gap_naming_the_missing_ones() -> None:
    seqs: SequenceTracker[None] = SequenceTracker()
    seqs.advance(0)
    verdict = seqs.classify(4)
    assert verdict.order is Order.GAP
    assert list(verdict.missing) == [1, 2, 3]
    # A restarted engine whose first batch was lost: a gap from 0.
    seqs.expect(0)
    assert seqs.classify(1) == Verdict(Order.GAP, 1, range(0, 1))


def test_an_older_number_is_a_duplicate_but_zero_after_others_is_a_restart() -> None:
    seqs: SequenceTracker[None] = SequenceTracker()
    for seq in range(3):
        seqs.advance(seq)
    assert seqs.classify(2).order is Order.DUPLICATE
    assert seqs.classify(1).order is Order.DUPLICATE
    assert seqs.classify(0).order is Order.RESTART
    seqs.advance(0)  # the restarted engine's first batch was taken
    assert seqs.next_seq == 1
    # Numbers alone cannot tell a copy of batch 0 from another restart: 0 always restarts.
    assert seqs.classify(0).order is Order.RESTART


def test_classifying_changes_nothing() -> None:
    seqs: SequenceTracker[str] = SequenceTracker(reorder_window=4)
    seqs.advance(0)
    for seq in (5, 0, 0, 1, 5):
        seqs.classify(seq)
    assert (seqs.next_seq, seqs.held, seqs.gap_since) == (1, {}, None)


def test_a_late_joiner_takes_its_first_number_from_the_first_batch() -> None:
    seqs: SequenceTracker[None] = SequenceTracker(first=None)
    assert not seqs.started
    assert seqs.classify(17) == Verdict(Order.NEXT, 17)  # not a gap: nothing came before
    assert seqs.classify(0) == Verdict(Order.NEXT, 0)  # nor a restart
    seqs.advance(17)
    assert seqs.started
    assert seqs.classify(18).order is Order.NEXT
    assert seqs.classify(3).order is Order.DUPLICATE
    assert seqs.classify(0).order is Order.RESTART


def test_held_batches_are_duplicates_and_come_out_in_order_once_the_gap_fills() -> None:
    seqs: SequenceTracker[str] = SequenceTracker(reorder_window=8, gap_timeout_s=2.0)
    seqs.advance(0)
    seqs.hold(3, "c", now=10.0)
    seqs.hold(2, "b", now=10.5)
    assert seqs.gap_since == 10.0  # the first batch held opens the gap
    assert seqs.classify(3).order is Order.DUPLICATE
    assert seqs.take_ready() == []
    seqs.advance(1)  # the missing batch came and was applied
    assert seqs.take_ready() == [(2, "b"), (3, "c")]
    assert (seqs.next_seq, seqs.held) == (4, {})
    assert not seqs.overdue(99.0)  # the gap closed


def test_a_gap_is_overdue_after_the_timeout_and_not_before() -> None:
    seqs: SequenceTracker[str] = SequenceTracker(reorder_window=8, gap_timeout_s=2.0)
    assert not seqs.overdue(100.0)  # no gap
    seqs.advance(0)
    seqs.hold(5, "e", now=10.0)
    assert not seqs.overdue(11.9)
    assert seqs.overdue(12.0)
    # A resync continues from the oldest held batch, which then follows without a gap.
    seqs.expect(seqs.oldest_held())
    assert not seqs.overdue(50.0)
    assert seqs.take_ready() == [(5, "e")]


def test_the_reorder_window_overflows_past_its_size() -> None:
    seqs: SequenceTracker[int] = SequenceTracker(reorder_window=2)
    seqs.advance(0)
    seqs.hold(2, 2, now=0.0)
    seqs.hold(3, 3, now=0.0)
    assert not seqs.overflowing
    seqs.hold(4, 4, now=0.0)
    assert seqs.overflowing


def test_expect_keeps_held_batches_from_the_new_start_on() -> None:
    seqs: SequenceTracker[str] = SequenceTracker(reorder_window=8)
    seqs.advance(0)
    for seq in (3, 6, 7):
        seqs.hold(seq, str(seq), now=1.0)
    seqs.expect(6)
    assert (seqs.next_seq, sorted(seqs.held), seqs.gap_since) == (6, [6, 7], None)
    assert seqs.take_ready() == [(6, "6"), (7, "7")]


def test_a_snapshot_replaces_the_position() -> None:
    seqs: SequenceTracker[str] = SequenceTracker(first=None, reorder_window=8)
    seqs.advance(0)
    seqs.hold(4, "d", now=1.0)
    seqs.hold(9, "i", now=1.0)
    seqs.load(5)  # as of batch 5: 6 comes next, 4 is older than the snapshot
    assert (seqs.next_seq, sorted(seqs.held), seqs.started) == (6, [9], True)
    assert seqs.classify(5).order is Order.DUPLICATE
    seqs.load(-1)  # an engine with no batch yet: the next batch seen sets the sequence
    assert not seqs.started and seqs.classify(40).order is Order.NEXT


def test_oldest_held_needs_a_held_batch() -> None:
    with pytest.raises(ValueError, match="no batch is held"):
        SequenceTracker[None]().oldest_held()


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"first": -1}, "first"),
        ({"reorder_window": -1}, "reorder_window"),
        ({"gap_timeout_s": 0.0}, "gap_timeout_s"),
        ({"gap_timeout_s": math.nan}, "gap_timeout_s"),
    ],
)
def test_bad_settings_are_refused_naming_the_key(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        SequenceTracker(**kwargs)
