"""The global KV-block index (fleet.coordinator.kvindex).

The central property: the keys the index builds from an engine's KV events equal the keys
:func:`block_keys` computes from the prompt's token ids, whatever the engine's own block hashes.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from fleet.coordinator.kvindex import EngineEntry, KVIndex, block_keys, chain_key, root_key
from fleet.protocol.kvevents import AllBlocksCleared, BlockHash, BlockRemoved, BlockStored

BS = 4  # block size


def tokens(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(n)]


def engine_hashes(toks: list[int], *, salt: int = 0) -> list[int]:
    """An engine's own chained block hashes: any function will do, salted per engine."""
    out, parent = [], salt
    for start in range(0, len(toks) - BS + 1, BS):
        parent = hash((parent, tuple(toks[start : start + BS]))) & (2**64 - 1)
        out.append(parent)
    return out


def stored(
    toks: list[int], hashes: list[BlockHash], parent: BlockHash | None = None, **kw: Any
) -> BlockStored:
    return BlockStored(
        block_hashes=tuple(hashes),
        parent_block_hash=parent,
        token_ids=tuple(toks),
        block_size=BS,
        **kw,
    )


def entry(index: KVIndex, engine_id: str) -> EngineEntry:
    found = index.engine(engine_id)
    assert found is not None
    return found


# -- block_keys --------------------------------------------------------------------------------


def test_block_keys_are_chained_per_full_block() -> None:
    toks = tokens(3 * BS)
    keys = block_keys("m", toks, BS)
    assert len(keys) == 3
    k0 = chain_key(root_key("m"), toks[:BS])
    assert keys == [k0, chain_key(k0, toks[BS : 2 * BS]), chain_key(keys[1], toks[2 * BS :])]
    assert all(0 <= k < 2**64 for k in keys)
    assert len(set(keys)) == 3


def test_same_tokens_give_same_keys_and_a_shared_prefix_shares_keys() -> None:
    toks = tokens(4 * BS)
    assert block_keys("m", toks, BS) == block_keys("m", list(toks), BS)
    other = toks[: 2 * BS] + tokens(2 * BS, seed=1)
    a, b = block_keys("m", toks, BS), block_keys("m", other, BS)
    assert a[:2] == b[:2]
    assert a[2] != b[2] and a[3] != b[3]


def test_a_change_in_an_early_block_changes_every_later_key() -> None:
    toks = tokens(3 * BS)
    changed = [toks[0] + 1, *toks[1:]]
    assert not set(block_keys("m", toks, BS)) & set(block_keys("m", changed, BS))


def test_different_model_gives_different_keys() -> None:
    toks = tokens(2 * BS)
    assert not set(block_keys("m", toks, BS)) & set(block_keys("n", toks, BS))
    assert root_key("m") != root_key("n")
    assert root_key("m") != root_key("m", "adapter")
    assert root_key("m", None) == root_key("m", "")


@pytest.mark.parametrize("extra", [0, 1, BS - 1])
def test_partial_last_block_is_ignored(extra: int) -> None:
    toks = tokens(2 * BS + extra)
    assert block_keys("m", toks, BS) == block_keys("m", toks[: 2 * BS], BS)
    assert len(block_keys("m", toks, BS)) == 2


def test_fewer_tokens_than_a_block_give_no_keys() -> None:
    assert block_keys("m", [], BS) == []
    assert block_keys("m", tokens(BS - 1), BS) == []


# -- BlockStored -------------------------------------------------------------------------------


def test_keys_from_events_equal_keys_from_prompt_tokens() -> None:
    """Batches chained by parent hash index exactly the prompt's block keys."""
    toks = tokens(7 * BS + 2)
    hashes = engine_hashes(toks)
    index = KVIndex()
    # Three batches: blocks 0-1, 2-4 (parent 1), 5-6 (parent 4); the partial tail is not stored.
    cuts = [(0, 2), (2, 5), (5, 7)]
    for seq, (lo, hi) in enumerate(cuts):
        event = stored(toks[lo * BS : hi * BS], hashes[lo:hi], hashes[lo - 1] if lo else None)
        assert index.apply("e1", "m", seq, [event])
    keys = block_keys("m", toks, BS)
    assert index.engine_keys("e1") == set(keys)
    assert index.match(keys, ["e1"]) == {"e1": 7}
    assert index.block_count() == 7
    e1 = entry(index, "e1")
    assert e1.blocks == dict(zip(hashes, keys, strict=True))
    assert (e1.batches, e1.events, e1.next_seq) == (3, 3, 3)
    assert index.stats["gaps"] == index.stats["orphans"] == 0


def test_bytes_block_hashes_work_like_ints() -> None:
    toks = tokens(3 * BS)
    hashes: list[BlockHash] = [f"h{i}".encode() for i in range(3)]
    index = KVIndex()
    index.apply("e1", "m", 0, [stored(toks[: 2 * BS], hashes[:2])])
    index.apply("e1", "m", 1, [stored(toks[2 * BS :], hashes[2:], hashes[1])])
    assert index.engine_keys("e1") == set(block_keys("m", toks, BS))


def test_two_engines_with_different_hashes_for_the_same_content_share_keys() -> None:
    toks = tokens(3 * BS)
    index = KVIndex()
    index.apply("e1", "m", 0, [stored(toks, engine_hashes(toks, salt=1))])
    index.apply("e2", "m", 0, [stored(toks, engine_hashes(toks, salt=2))])
    assert engine_hashes(toks, salt=1) != engine_hashes(toks, salt=2)
    keys = block_keys("m", toks, BS)
    assert index.engine_keys("e1") == index.engine_keys("e2") == set(keys)
    assert index.block_count() == 3
    assert index.match(keys, ["e1", "e2"]) == {"e1": 3, "e2": 3}


def test_lora_blocks_are_rooted_apart_from_the_base_model() -> None:
    toks = tokens(2 * BS)
    index = KVIndex()
    index.apply("e1", "m", 0, [stored(toks, engine_hashes(toks), lora_name="ad")])
    assert not index.engine_keys("e1") & set(block_keys("m", toks, BS))
    assert index.block_count() == 2


def test_orphan_parent_is_counted_and_skipped() -> None:
    toks = tokens(3 * BS)
    hashes = engine_hashes(toks)
    index = KVIndex()
    index.apply("e1", "m", 0, [stored(toks[BS:], hashes[1:], parent=hashes[0])])
    assert index.stats["orphans"] == 1
    assert index.engine_keys("e1") == set()
    assert index.block_count() == 0
    # A later well-rooted batch still applies.
    index.apply("e1", "m", 1, [stored(toks, hashes)])
    assert index.engine_keys("e1") == set(block_keys("m", toks, BS))


@pytest.mark.parametrize(
    "event",
    [
        BlockStored(block_hashes=(1, 2), parent_block_hash=None, token_ids=(1,) * 7, block_size=4),
        BlockStored(block_hashes=(1,), parent_block_hash=None, token_ids=(1,) * 4, block_size=0),
    ],
)
def test_malformed_block_stored_is_counted_and_skipped(event: BlockStored) -> None:
    index = KVIndex()
    assert index.apply("e1", "m", 0, [event])
    assert index.stats["malformed"] == 1
    assert index.block_count() == 0


def test_restoring_a_hash_with_new_content_moves_its_key() -> None:
    a, b = tokens(BS, seed=1), tokens(BS, seed=2)
    index = KVIndex()
    index.apply("e1", "m", 0, [stored(a, [7])])
    index.apply("e1", "m", 1, [stored(b, [7])])
    assert index.engine_keys("e1") == set(block_keys("m", b, BS))
    assert index.block_count() == 1


def test_one_key_under_two_engine_hashes_is_held_until_both_are_removed() -> None:
    # Same tokens, different engine hashes (e.g. another cache salt): one Fleet key.
    toks = tokens(BS)
    keys = block_keys("m", toks, BS)
    index = KVIndex()
    index.apply("e1", "m", 0, [stored(toks, [1]), stored(toks, [2])])
    assert index.block_count() == 1
    index.apply("e1", "m", 1, [BlockRemoved(block_hashes=(1,))])
    assert index.match(keys, ["e1"]) == {"e1": 1}
    assert index.engine_keys("e1") == set(keys)
    index.apply("e1", "m", 2, [BlockRemoved(block_hashes=(2,))])
    assert index.match(keys, ["e1"]) == {"e1": 0}
    assert index.block_count() == 0


def test_storing_the_same_block_twice_needs_one_removal() -> None:
    toks = tokens(BS)
    index = KVIndex()
    index.apply("e1", "m", 0, [stored(toks, [1]), stored(toks, [1])])
    index.apply("e1", "m", 1, [BlockRemoved(block_hashes=(1,))])
    assert index.block_count() == 0
    assert index.engine_keys("e1") == set()


# -- BlockRemoved and AllBlocksCleared ---------------------------------------------------------


def test_block_removed_drops_only_those_blocks() -> None:
    toks = tokens(3 * BS)
    hashes = engine_hashes(toks)
    keys = block_keys("m", toks, BS)
    index = KVIndex()
    index.apply("e1", "m", 0, [stored(toks, hashes)])
    index.apply("e1", "m", 1, [BlockRemoved(block_hashes=(hashes[2], 12345))])
    assert index.engine_keys("e1") == set(keys[:2])
    assert index.match(keys, ["e1"]) == {"e1": 2}
    index.apply("e1", "m", 2, [BlockRemoved(block_hashes=(hashes[0],))])
    assert index.match(keys, ["e1"]) == {"e1": 0}  # a prefix match stops at the hole
    assert index.engine_keys("e1") == {keys[1]}


def test_removing_from_one_engine_keeps_the_other_holder() -> None:
    toks = tokens(2 * BS)
    keys = block_keys("m", toks, BS)
    index = KVIndex()
    index.apply("e1", "m", 0, [stored(toks, engine_hashes(toks, salt=1))])
    index.apply("e2", "m", 0, [stored(toks, engine_hashes(toks, salt=2))])
    index.apply("e1", "m", 1, [BlockRemoved(block_hashes=tuple(engine_hashes(toks, salt=1)))])
    assert index.match(keys, ["e1", "e2"]) == {"e1": 0, "e2": 2}
    assert index.block_count() == 2


def test_all_blocks_cleared_empties_the_engine_only() -> None:
    toks = tokens(2 * BS)
    index = KVIndex()
    index.apply("e1", "m", 0, [stored(toks, engine_hashes(toks))])
    index.apply("e2", "m", 0, [stored(toks, engine_hashes(toks))])
    index.apply("e1", "m", 1, [AllBlocksCleared()])
    assert index.engine_keys("e1") == set()
    assert index.engine_keys("e2") == set(block_keys("m", toks, BS))
    assert index.engine_ids() == ["e1", "e2"]


def test_events_in_one_batch_apply_in_order() -> None:
    toks = tokens(2 * BS)
    hashes = engine_hashes(toks)
    index = KVIndex()
    index.apply(
        "e1", "m", 0, [stored(toks, hashes), AllBlocksCleared(), stored(toks[:BS], hashes[:1])]
    )
    assert index.engine_keys("e1") == set(block_keys("m", toks, BS)[:1])
    assert entry(index, "e1").events == 3


def test_holders_are_cleaned_up_so_block_count_returns_to_zero() -> None:
    index = KVIndex()
    for n, engine_id in enumerate(("e1", "e2", "e3")):
        toks = tokens(3 * BS, seed=n % 2)
        index.apply(engine_id, "m", 0, [stored(toks, engine_hashes(toks, salt=n))])
    assert index.block_count() == 6
    toks = tokens(3 * BS, seed=0)
    index.apply("e1", "m", 1, [BlockRemoved(block_hashes=tuple(engine_hashes(toks, salt=0)))])
    index.apply("e2", "m", 1, [AllBlocksCleared()])
    assert index.block_count() == 3
    index.drop_engine("e3", "engine_gone")
    assert index.block_count() == 0


# -- sequence numbers --------------------------------------------------------------------------


def test_duplicate_or_older_batch_is_skipped() -> None:
    toks = tokens(3 * BS)
    hashes = engine_hashes(toks)
    index = KVIndex()
    for seq in range(3):
        parent = hashes[seq - 1] if seq else None
        event = stored(toks[seq * BS : (seq + 1) * BS], hashes[seq : seq + 1], parent)
        assert index.apply("e1", "m", seq, [event]) == "applied"
    assert index.apply("e1", "m", 2, [AllBlocksCleared()]) == "duplicate"
    assert index.apply("e1", "m", 1, [AllBlocksCleared()]) == "duplicate"
    assert index.stats["duplicates"] == 2
    assert index.stats["restarts"] == 0
    assert index.engine_keys("e1") == set(block_keys("m", toks, BS))
    assert entry(index, "e1").next_seq == 3
    assert entry(index, "e1").batches == 3


def test_seq_zero_after_others_is_a_restart_that_clears_the_engine() -> None:
    old, new = tokens(2 * BS, seed=1), tokens(2 * BS, seed=2)
    index = KVIndex()
    index.apply("e1", "m", 0, [stored(old, engine_hashes(old))])
    index.apply("e1", "m", 1, [])
    assert index.apply("e1", "m", 0, [stored(new, engine_hashes(new))]) == "restart"
    assert index.stats["restarts"] == 1
    assert index.engine_keys("e1") == set(block_keys("m", new, BS))
    assert index.block_count() == 2
    assert entry(index, "e1").next_seq == 1


def test_a_restart_drops_the_old_process_batches_held_behind_a_gap() -> None:
    old, new = tokens(2 * BS, seed=1), tokens(2 * BS, seed=2)
    index = KVIndex(reorder_window=8)
    index.apply("e1", "m", 0, [])
    assert index.apply("e1", "m", 2, [stored(old, engine_hashes(old))]) == "waiting"  # 1 lost
    assert index.apply("e1", "m", 0, []) == "restart"  # the new process
    index.apply("e1", "m", 1, [])
    # the new process's batch 2 is its own, not a duplicate of the old one held
    assert index.apply("e1", "m", 2, [stored(new, engine_hashes(new))]) == "applied"
    assert index.engine_keys("e1") == set(block_keys("m", new, BS))


def _chain(n: int) -> tuple[list[int], list[BlockStored]]:
    """n one-block BlockStored events of one sequence, chained."""
    toks = tokens(n * BS)
    hashes = engine_hashes(toks)
    events = [
        stored(toks[i * BS : (i + 1) * BS], hashes[i : i + 1], hashes[i - 1] if i else None)
        for i in range(n)
    ]
    return toks, events


def test_batches_behind_a_gap_wait_then_apply_once_in_order() -> None:
    toks, events = _chain(4)
    index = KVIndex()
    assert index.apply("e1", "m", 0, [events[0]]) == "applied"
    # 2 and 3 arrive before 1 (a replayed batch comes late); 3 arrives twice.
    assert index.apply("e1", "m", 2, [events[2]], now=10.0) == "waiting"
    assert index.apply("e1", "m", 3, [events[3]], now=10.1) == "waiting"
    assert index.apply("e1", "m", 3, [events[3]], now=10.2) == "duplicate"
    assert index.engine_keys("e1") == set(block_keys("m", toks[:BS], BS))  # nothing past the gap
    assert index.apply("e1", "m", 1, [events[1]], now=10.3) == "applied"
    assert index.engine_keys("e1") == set(block_keys("m", toks, BS))  # chained, all four
    assert index.stats["gaps"] == 1 and index.stats["orphans"] == 0
    assert entry(index, "e1").next_seq == 4 and entry(index, "e1").batches == 4
    assert index.expire(now=100.0) == []  # no gap left open


def test_a_gap_that_stays_open_resyncs_the_engine() -> None:
    old, old_events = _chain(2)
    index = KVIndex(gap_timeout_s=2.0)
    index.apply("e1", "m", 0, old_events[:1])
    index.apply("e1", "m", 1, old_events[1:])
    new = tokens(BS, seed=9)
    index.apply("e1", "m", 5, [stored(new, [77])], now=50.0)  # 2..4 lost for good
    assert index.expire(now=51.9) == []
    assert index.engine_keys("e1") == set(block_keys("m", old, BS))
    assert index.expire(now=52.0) == ["e1"]
    # What the engine held before the gap may have been evicted since: it is gone; the waiting
    # batch is applied, and the sequence goes on from it.
    assert index.engine_keys("e1") == set(block_keys("m", new, BS))
    assert index.stats["resyncs"] == 1
    assert index.apply("e1", "m", 6, []) == "applied"


def test_too_many_waiting_batches_resync_at_once() -> None:
    index = KVIndex(reorder_window=3)
    index.apply("e1", "m", 0, [stored(tokens(BS), [1])])
    for seq in (2, 3, 4):
        assert index.apply("e1", "m", seq, []) == "waiting"
    index.apply("e1", "m", 5, [])
    assert index.stats["resyncs"] == 1
    assert index.engine_keys("e1") == set()
    assert entry(index, "e1").next_seq == 6 and not entry(index, "e1").pending


def test_a_batch_flagged_resync_drops_the_engine_first() -> None:
    old, new = tokens(BS, seed=1), tokens(BS, seed=2)
    index = KVIndex()
    index.apply("e1", "m", 0, [stored(old, [1])])
    assert index.apply("e1", "m", 40, [stored(new, [2])], resync=True) == "resync"
    assert index.engine_keys("e1") == set(block_keys("m", new, BS))
    assert index.stats["resyncs"] == 1 and index.stats["gaps"] == 0
    assert index.apply("e1", "m", 41, []) == "applied"


def test_the_first_batch_seen_sets_the_sequence() -> None:
    index = KVIndex()
    assert index.apply("e1", "m", 17, [stored(tokens(BS), [1])]) == "applied"
    assert index.stats["gaps"] == 0 and index.engine_keys("e1")


def test_entries_are_capped_and_counted() -> None:
    index = KVIndex(max_entries=3)
    toks, events = _chain(5)
    for seq, event in enumerate(events):
        index.apply("e1", "m", seq, [event])
    assert index.entries == 3 and len(index.engine_keys("e1")) == 3
    assert index.stats["capped"] == 1  # the 4th; the 5th is an orphan of it
    index.drop_engine("e1", "engine_gone")
    assert index.entries == 0 and index.block_count() == 0


def test_sequences_are_per_engine() -> None:
    index = KVIndex()
    assert index.apply("e1", "m", 0, []) == "applied"
    assert index.apply("e1", "m", 1, []) == "applied"
    assert index.apply("e2", "m", 0, []) == "applied"
    assert index.stats["restarts"] == index.stats["duplicates"] == 0


def test_an_engine_that_changes_model_starts_over() -> None:
    toks = tokens(BS)
    index = KVIndex()
    index.apply("e1", "m", 0, [stored(toks, [1])])
    index.apply("e1", "n", 1, [stored(toks, [1])])
    assert index.engine_keys("e1") == set(block_keys("n", toks, BS))
    assert index.block_count() == 1
    assert entry(index, "e1").model == "n"


# -- queries -----------------------------------------------------------------------------------


def test_match_is_the_longest_prefix_per_engine() -> None:
    toks = tokens(4 * BS)
    keys = block_keys("m", toks, BS)
    index = KVIndex()
    index.apply("full", "m", 0, [stored(toks, engine_hashes(toks))])
    index.apply("half", "m", 0, [stored(toks[: 2 * BS], engine_hashes(toks)[:2])])
    other = tokens(4 * BS, seed=9)
    index.apply("other", "m", 0, [stored(other, engine_hashes(other))])
    assert index.match(keys, ["full", "half", "other", "unknown"]) == {
        "full": 4,
        "half": 2,
        "other": 0,
        "unknown": 0,
    }
    assert index.match(keys[:3], ["full"]) == {"full": 3}
    assert index.match([], ["full"]) == {"full": 0}
    assert index.match(keys, []) == {}


def test_drop_engine_forgets_it() -> None:
    toks = tokens(2 * BS)
    keys = block_keys("m", toks, BS)
    index = KVIndex()
    index.apply("e1", "m", 0, [stored(toks, engine_hashes(toks))])
    index.apply("e2", "m", 0, [stored(toks, engine_hashes(toks))])
    index.drop_engine("e1", "engine_gone")
    index.drop_engine("never-seen", "node_lost")
    assert index.engine("e1") is None
    assert index.engine_keys("e1") == set()
    assert index.engine_ids() == ["e2"]
    assert index.match(keys, ["e1", "e2"]) == {"e1": 0, "e2": 2}
    # It may come back, its sequence starting over.
    assert index.apply("e1", "m", 0, [])
    assert index.stats["duplicates"] == index.stats["restarts"] == 0


@pytest.mark.parametrize("seed", range(5))
def test_random_event_streams_keep_the_index_consistent(seed: int) -> None:
    """After any mix of stores, removals and clears, holders agree with each engine's blocks."""
    rng = random.Random(seed)
    prompts = [tokens(4 * BS, seed=s) for s in range(3)]
    index = KVIndex()
    seqs = {"e1": 0, "e2": 0}
    for _ in range(200):
        engine_id = rng.choice(sorted(seqs))
        toks = rng.choice(prompts)
        hashes: list[BlockHash] = list(engine_hashes(toks, salt=rng.randrange(2)))
        op = rng.random()
        if op < 0.6:
            lo = rng.randrange(4)
            hi = rng.randrange(lo, 4) + 1
            parent = hashes[lo - 1] if lo else None
            event: BlockStored | BlockRemoved | AllBlocksCleared = stored(
                toks[lo * BS : hi * BS], hashes[lo:hi], parent
            )
        elif op < 0.95:
            event = BlockRemoved(block_hashes=tuple(rng.sample(hashes, rng.randrange(1, 5))))
        else:
            event = AllBlocksCleared()
        index.apply(engine_id, "m", seqs[engine_id], [event])
        seqs[engine_id] += 1
        held = {e: index.engine_keys(e) for e in seqs}
        assert index.block_count() == len(held["e1"] | held["e2"])
        for e, keys in held.items():
            assert keys <= {k for p in prompts for k in block_keys("m", p, BS)}
            for key in keys:
                assert index.match([key], [e]) == {e: 1}
    for e in seqs:
        index.drop_engine(e, "engine_gone")
    assert index.block_count() == 0


def test_match_agrees_with_a_block_by_block_walk() -> None:
    rng = random.Random(3)
    index = KVIndex()
    prompt = tokens(12 * BS, seed=5)
    keys = block_keys("m", prompt, BS)
    engines = [f"e{i}" for i in range(6)]
    for i, engine_id in enumerate(engines):
        n = rng.randrange(len(keys) + 1) if i else len(keys)
        if n:
            index.apply(
                engine_id, "m", 0, [stored(prompt[: n * BS], engine_hashes(prompt[: n * BS]))]
            )

    def naive(engine_id: str) -> int:
        held = index.engine_keys(engine_id)
        depth = 0
        while depth < len(keys) and keys[depth] in held:
            depth += 1
        return depth

    got = index.match(keys, [*engines, "absent"])
    assert got == {e: naive(e) for e in [*engines, "absent"]}
    assert got["e0"] == len(keys) and got["absent"] == 0
    assert index.match([], engines) == dict.fromkeys(engines, 0)


def test_block_keys_are_the_chain_and_are_computed_lazily() -> None:
    from fleet.coordinator.kvindex import BlockKeys

    toks = tokens(100 * BS + 3)
    expected, parent = [], root_key("m")
    for i in range(100):
        parent = chain_key(parent, toks[i * BS : (i + 1) * BS])
        expected.append(parent)
    assert block_keys("m", toks, BS) == expected
    keys = BlockKeys("m", toks, BS)
    assert len(keys) == 100
    assert list(keys.head(5)) == expected[:5]
    assert len(keys._keys) < 100  # only a batch was hashed
    index = KVIndex()
    index.apply("e1", "m", 0, [stored(toks[: 3 * BS], engine_hashes(toks[: 3 * BS]))])
    assert index.match(keys, ["e1"]) == {"e1": 3}
    assert len(keys._keys) < 100  # the walk stopped at block 4
    assert list(keys) == expected and block_keys("m", toks[: BS - 1], BS) == []


# -- dropping an engine: one owner, counted by reason --------------------------------------------


def test_every_drop_of_an_engines_entries_is_counted_by_reason() -> None:
    index = KVIndex(reorder_window=1, gap_timeout_s=2.0)
    toks = tokens(BS)
    index.apply("e1", "m", 0, [stored(toks, [1])])
    index.apply("e1", "m", 0, [stored(toks, [1])])  # the engine restarted
    index.apply("e1", "m", 9, [stored(toks, [1])], resync=True)  # the agent lost batches
    index.apply("e1", "m", 12, [], now=1.0)  # a gap that stays open
    assert index.expire(3.0) == ["e1"]
    index.apply("e1", "m", 20, [])
    index.apply("e1", "m", 21, [])  # two waiting behind a gap: past the window
    index.load_snapshot("e1", "m", 30, [stored(toks, [1])], first=True)
    index.apply("e1", "n", 31, [])  # the id now serves another model
    index.drop_engine("e1", "engine_restarted")
    index.drop_engine("never-seen", "node_lost")  # nothing to drop: not counted
    assert index.drops == {
        "restart": 1,
        "resync": 1,
        "gap_timeout": 1,
        "reorder_window": 1,
        "snapshot": 1,
        "model_changed": 1,
        "engine_restarted": 1,
    }
    assert index.engine_ids() == [] and index.block_count() == 0


def test_a_drop_without_a_known_reason_is_refused() -> None:
    index = KVIndex()
    index.apply("e1", "m", 0, [stored(tokens(BS), [1])])
    with pytest.raises(ValueError, match="reason: 'gone' is not one of"):
        index.drop_engine("e1", "gone")  # type: ignore[arg-type]
    assert index.block_count() == 1 and not index.drops
