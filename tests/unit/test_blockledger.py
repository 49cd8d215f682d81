"""The agent's block ledger: a snapshot rebuilds exactly the index the live events built."""

from __future__ import annotations

import random

from fleet.agent.blockledger import BlockLedger
from fleet.coordinator.kvindex import KVIndex
from fleet.protocol.kvevents import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent


def _random_batches(rng: random.Random, n: int) -> list[list[KVEvent]]:
    """Conversations growing chains of blocks, evictions, now and then a clear."""
    batches: list[list[KVEvent]] = []
    held: list[int] = []
    next_hash = 1
    for _ in range(n):
        roll = rng.random()
        if roll < 0.6:
            parent = rng.choice(held) if held and rng.random() < 0.7 else None
            count = rng.randint(1, 5)
            hashes = tuple(range(next_hash, next_hash + count))
            next_hash += count
            tokens = tuple(rng.randrange(1000) for _ in range(4 * count))
            batches.append([BlockStored(hashes, parent, tokens, 4)])
            held.extend(hashes)
        elif roll < 0.97 and held:
            gone = tuple(rng.sample(held, min(len(held), rng.randint(1, 3))))
            held = [h for h in held if h not in gone]
            batches.append([BlockRemoved(gone)])
        else:
            held = []
            batches.append([AllBlocksCleared()])
    return batches


def test_a_snapshot_rebuilds_the_index_the_events_built() -> None:
    rng = random.Random(7)
    for trial in range(20):
        live, ledger = KVIndex(), BlockLedger()
        batches = _random_batches(rng, 200)
        for seq, events in enumerate(batches):
            live.apply("e", "m", seq, events)
            ledger.apply(seq, events)
        rebuilt = KVIndex()
        parts = ledger.snapshot(part_blocks=16)
        stored = [[ev for ev in part if isinstance(ev, BlockStored)] for part in parts]
        assert all(sum(len(ev.block_hashes) for ev in part) <= 16 for part in stored)
        for i, part in enumerate(parts or [()]):
            rebuilt.load_snapshot("e", "m", ledger.seq, part, first=i == 0)
        assert rebuilt.engine_keys("e") == live.engine_keys("e"), trial
        assert len(ledger) == rebuilt.engine_block_count("e")
        # The next live batch continues the rebuilt index; replays of older ones are duplicates.
        assert rebuilt.apply("e", "m", ledger.seq, batches[-1]) == "duplicate"
        assert rebuilt.apply("e", "m", ledger.seq + 1, [AllBlocksCleared()]) == "applied"
        assert not rebuilt.engine_keys("e")


def test_a_restarted_engine_or_a_resync_empties_the_ledger() -> None:
    ledger = BlockLedger()
    ledger.apply(0, [BlockStored((1, 2), None, tuple(range(8)), 4)])
    assert len(ledger) == 2
    ledger.apply(5, [BlockStored((3,), 2, tuple(range(4)), 4)], reset=True)
    assert len(ledger) == 1 and ledger.seq == 5
    ledger.apply(0, [])  # batch 0 again: a new engine process
    assert len(ledger) == 0
    ledger.apply(1, [BlockStored((9,), None, (1, 2), 4)])  # malformed: fewer tokens than blocks
    assert len(ledger) == 0 and ledger.snapshot() == []


def test_chains_become_one_event_each() -> None:
    ledger = BlockLedger()
    ledger.apply(0, [BlockStored((1, 2, 3), None, tuple(range(12)), 4)])
    ledger.apply(1, [BlockStored((4,), 3, tuple(range(4)), 4)])
    ledger.apply(2, [BlockStored((5,), 1, tuple(range(4)), 4)])  # a branch
    (part,) = ledger.snapshot()
    assert [ev.block_hashes for ev in part] == [(1, 2, 3, 4), (5,)]
    assert part[1].parent_block_hash == 1
