"""The simulator's prefix cache against vLLM 0.32's block-pool semantics.

The hash values below were published by a real vLLM 0.32 CPU engine (block size 32, sha256,
no PYTHONHASHSEED) for the same tokens, so the simulator's KV events name blocks exactly as a
real engine's do.
"""

from __future__ import annotations

import hashlib
import pickle

import pytest

from fleet.agent.sim.cache import PrefixCache, external_hash, hash_block, none_hash
from fleet.protocol.kvevents import AllBlocksCleared, BlockRemoved, BlockStored

# Tokens 3..66 as one token-id prompt, and what vLLM published for its two blocks.
RANGE_PROMPT = tuple(range(3, 67))
RANGE_HASHES = (8704213067995889238, 2115308636467158532)
# The first 64 tokens of a 91-token text prompt of the demo model, and vLLM's two hashes.
TEXT_PROMPT = (
    0, 40, 296, 288, 1312, 86, 318, 904, 717, 375, 385, 889, 1262, 703, 900, 85, 385, 1249,
    304, 353, 345, 75, 90, 416, 929, 353, 277, 82, 86, 16, 223, 40, 296, 288, 1312, 86, 318,
    904, 717, 375, 385, 889, 1262, 703, 900, 85, 385, 1249, 304, 353, 345, 75, 90, 416, 929,
    353, 277, 82, 86, 16, 223, 40, 296, 288,
)  # fmt: skip
TEXT_HASHES = (13288385628373516491, 4727159390997840147)
SEED = "vllm-none-hash"


def _cache(num_blocks: int = 64, block_size: int = 32, **kw: bool) -> PrefixCache:
    return PrefixCache(block_size=block_size, num_blocks=num_blocks, hash_seed=SEED, **kw)


def _chain(tokens: tuple[int, ...], size: int = 32, seed: str = SEED) -> list[int]:
    root, parent, out = none_hash(seed), None, []
    for i in range(len(tokens) // size):
        parent = hash_block(parent, tokens[i * size : (i + 1) * size], root)
        out.append(external_hash(parent))
    return out


def _admit(cache: PrefixCache, rid: str, tokens: tuple[int, ...]) -> int:
    hit = cache.lookup(rid, tokens)
    assert cache.allocate(rid, tokens, hit, len(tokens) - hit)
    return hit


def test_block_hashes_are_the_ones_a_real_vllm_engine_publishes() -> None:
    assert tuple(_chain(RANGE_PROMPT)) == RANGE_HASHES
    assert tuple(_chain(TEXT_PROMPT)) == TEXT_HASHES


def test_hash_formula_matches_the_reference_with_pythonhashseed_0() -> None:
    tokens = tuple(range(100, 132))
    p = hashlib.sha256(pickle.dumps("0", 5)).digest()
    h = hashlib.sha256(pickle.dumps((p, tokens, None), 5)).digest()
    assert _chain(tokens, seed="0") == [int.from_bytes(h[-8:], "big")]
    assert _chain(tokens, seed="0") != _chain(tokens, seed=SEED)


def test_prompt_blocks_are_stored_in_one_chained_event() -> None:
    cache = _cache()
    tokens = RANGE_PROMPT + (1, 2, 3)  # two full blocks and a partial one
    assert _admit(cache, "a", tokens) == 0
    (event,) = cache.take_events()
    assert event == BlockStored(
        block_hashes=RANGE_HASHES,
        parent_block_hash=None,
        token_ids=RANGE_PROMPT,
        block_size=32,
        lora_name=None,
        medium="GPU",
    )
    assert cache.blocks_of("a") == 3
    assert cache.take_events() == []


def test_generated_tokens_fill_blocks_that_are_stored_with_their_parent() -> None:
    cache = _cache(block_size=4)
    tokens = [1, 2, 3, 4, 5, 6]
    _admit(cache, "a", tuple(tokens))
    first = cache.take_events()
    assert [e.block_hashes for e in first if isinstance(e, BlockStored)] == [
        (_chain((1, 2, 3, 4), 4)[0],)
    ]
    computed = len(tokens)
    for token in (7, 8, 9):  # decode: each step computes the token sampled before it
        tokens.append(token)
        assert cache.allocate("a", tokens, computed, 1)
        computed += 1
    (event,) = cache.take_events()
    assert isinstance(event, BlockStored)
    expected = _chain((1, 2, 3, 4, 5, 6, 7, 8), 4)
    assert event.block_hashes == (expected[1],) and event.parent_block_hash == expected[0]
    assert event.token_ids == (5, 6, 7, 8)


def test_a_hit_is_capped_one_token_short_and_the_last_block_is_stored_again() -> None:
    cache = _cache()
    _admit(cache, "a", RANGE_PROMPT)
    cache.take_events()
    cache.free("a")
    assert _admit(cache, "b", RANGE_PROMPT) == 32  # not 64: the last token is recomputed
    (event,) = cache.take_events()
    assert isinstance(event, BlockStored)
    assert event.block_hashes == (RANGE_HASHES[1],) and event.parent_block_hash == RANGE_HASHES[0]
    assert _admit(cache, "c", RANGE_PROMPT + (5,)) == 64


def test_least_recently_released_blocks_are_evicted_first_tail_before_head() -> None:
    cache = _cache(num_blocks=5, block_size=2)  # 4 usable blocks
    _admit(cache, "a", (1, 2, 3, 4))
    cache.free("a")
    _admit(cache, "b", (5, 6, 7, 8))
    cache.free("b")
    cache.take_events()
    a_hashes, b_hashes = _chain((1, 2, 3, 4), 2), _chain((5, 6, 7, 8), 2)
    _admit(cache, "c", (9, 10, 11))  # needs 2 blocks: a's, tail first
    events = cache.take_events()
    removed = [e.block_hashes[0] for e in events if isinstance(e, BlockRemoved)]
    assert removed == [a_hashes[1], a_hashes[0]]
    assert all(e.medium == "GPU" for e in events if isinstance(e, BlockRemoved))
    assert cache.lookup("x", (5, 6, 7, 8, 0)) == 4 and cache.lookup("y", (1, 2, 0)) == 0
    assert b_hashes  # b's blocks survived


def test_referenced_and_hit_blocks_are_never_evicted() -> None:
    cache = _cache(num_blocks=4, block_size=2)  # 3 usable blocks
    _admit(cache, "a", (1, 2, 3, 4))  # holds 2
    assert not cache.allocate("b", (9, 9, 9, 9, 9), 0, 5)  # needs 3, only 1 free
    assert cache.blocks_of("b") == 0 and cache.num_free_blocks == 1
    cache.free("a")
    cache.take_events()
    # c hits a's first block; the 2 new blocks come from the other 2, not from the hit one.
    assert _admit(cache, "c", (1, 2, 7, 7, 7)) == 2
    removed = [e for e in cache.take_events() if isinstance(e, BlockRemoved)]
    assert [e.block_hashes for e in removed] == [(_chain((1, 2, 3, 4), 2)[1],)]
    assert cache.num_free_blocks == 0 and cache.usage == 1.0


def test_usage_counts_referenced_blocks_only() -> None:
    cache = _cache(num_blocks=11, block_size=2)
    assert cache.usage == 0.0
    _admit(cache, "a", (1, 2, 3, 4, 5))
    assert cache.usage == pytest.approx(0.3)
    cache.free("a")
    assert cache.usage == 0.0 and cache.num_cached_hashes == 2


def test_reset_needs_an_idle_cache_and_emits_all_blocks_cleared() -> None:
    cache = _cache()
    _admit(cache, "a", RANGE_PROMPT)
    cache.take_events()
    assert not cache.reset()
    assert cache.take_events() == []
    cache.free("a")
    assert cache.reset()
    assert cache.take_events() == [AllBlocksCleared()]
    assert cache.lookup("b", RANGE_PROMPT + (1,)) == 0


def test_without_prefix_caching_nothing_hits_and_nothing_is_published() -> None:
    cache = _cache(enable_caching=False)
    _admit(cache, "a", RANGE_PROMPT)
    cache.free("a")
    assert _admit(cache, "b", RANGE_PROMPT + (1,)) == 0
    assert cache.take_events() == []


def test_events_can_be_switched_off_while_caching_stays_on() -> None:
    cache = _cache(events_enabled=False)
    _admit(cache, "a", RANGE_PROMPT)
    cache.free("a")
    assert _admit(cache, "b", RANGE_PROMPT + (1,)) == 64
    assert cache.take_events() == []
