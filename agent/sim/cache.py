"""A paged prefix cache that behaves, and reports, like vLLM 0.32's block pool.

Sans-I/O: the scheduler calls it; it returns decisions and queues the KV events a real engine
would publish. What it mirrors (vllm/v1/core/block_pool.py, kv_cache_manager.py,
single_type_kv_cache_manager.py, kv_cache_utils.py):

* **Blocks.** ``num_blocks`` physical blocks; block 0 is vLLM's null block and never used, so
  usage is ``1 - free / (num_blocks - 1)``. A request holds a list of blocks; a block is *free*
  when no request references it, and a free block may still be *cached* (it keeps its hash and
  can be hit) until it is handed out again.
* **Eviction order.** One free queue: allocation pops from the front. When a request ends, its
  blocks are released tail first; uncached (partial) blocks go to the front of the queue, cached
  ones to the back. So the least recently released cached block is evicted first, and a
  request's tail before its head. Each evicted cached block emits ``BlockRemoved([hash])``.
* **Hashes.** Full blocks only, chained: ``sha256(pickle((parent_digest or NONE_HASH,
  tuple(tokens), None)))``, ``NONE_HASH = sha256(pickle(seed))``; events carry the last 8
  digest bytes as a big-endian uint64 (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``).
* **Lookups.** The longest run of cached full blocks from the start, capped at ``len(tokens) - 1``
  tokens (the last prompt token is always recomputed for its logits), so a prompt of exactly k
  blocks hits at most k - 1 and its last block is computed, and stored, again.
* **BlockStored.** When a step's computed tokens complete full blocks (prompt or generated
  tokens), one event per request per step lists them, ``parent_block_hash`` = the block before
  the first of them (None from block 0). Blocks are not de-duplicated, as in vLLM: the same hash
  may be held by two blocks, stored twice and removed twice.
* **Reset.** Only when no block is referenced; clears every hash and emits ``AllBlocksCleared``.
"""

from __future__ import annotations

import hashlib
import pickle
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from fleet.protocol.kvevents import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

MEDIUM_GPU: Final[str] = "GPU"
"""vLLM reports this medium for its own KV cache, CPU build included."""


def none_hash(seed: str) -> bytes:
    """Return vLLM's ``NONE_HASH`` for ``seed`` (sha256 of the pickled seed string)."""
    return hashlib.sha256(pickle.dumps(seed, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def hash_block(parent: bytes | None, tokens: Sequence[int], root: bytes) -> bytes:
    """Return the digest of one full block, chained on its parent's digest.

    Args:
        parent: the previous block's digest, or None for the first block.
        tokens: the block's token ids (exactly one block of them).
        root: ``NONE_HASH``, used as the parent of the first block.

    Returns:
        The 32-byte sha256 digest, as vLLM computes it with ``--prefix-caching-hash-algo sha256``.
    """
    data = pickle.dumps((parent or root, tuple(tokens), None), protocol=pickle.HIGHEST_PROTOCOL)
    return hashlib.sha256(data).digest()


def external_hash(digest: bytes) -> int:
    """Return the hash vLLM publishes for a digest: its last 8 bytes, big-endian."""
    return int.from_bytes(digest[-8:], "big")


@dataclass(slots=True, eq=False)
class _Block:
    block_id: int
    ref_cnt: int = 0
    digest: bytes | None = None


@dataclass(slots=True)
class _Holder:
    """A request's blocks and the hashes of its full blocks so far."""

    blocks: list[_Block] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)
    num_cached_blocks: int = 0


class PrefixCache:
    """vLLM's paged KV cache with prefix caching, for one simulated engine.

    Args:
        block_size: tokens per block.
        num_blocks: physical blocks, including the null block (so ``num_blocks - 1`` usable).
        hash_seed: the seed of ``NONE_HASH``.
        enable_caching: False behaves like ``--no-enable-prefix-caching`` (no hits, no events).
        events_enabled: whether KV events are queued (``enable_kv_cache_events``).

    Raises:
        ValueError: ``block_size < 1`` or ``num_blocks < 2``.
    """

    def __init__(
        self,
        *,
        block_size: int,
        num_blocks: int,
        hash_seed: str,
        enable_caching: bool = True,
        events_enabled: bool = True,
    ) -> None:
        if block_size < 1 or num_blocks < 2:
            raise ValueError(f"bad cache geometry: block_size={block_size} num_blocks={num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.events_enabled = events_enabled and enable_caching
        self.root = none_hash(hash_seed)
        self._blocks = [_Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order (front first); block 0 is the null block.
        self._free: OrderedDict[int, _Block] = OrderedDict(
            (b.block_id, b) for b in self._blocks[1:]
        )
        self._cached: dict[bytes, dict[int, _Block]] = {}
        self._holders: dict[str, _Holder] = {}
        self._events: list[KVEvent] = []

    # -- queries ------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request references (cached or not)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """vLLM's ``kv_cache_usage_perc``: the share of usable blocks requests reference."""
        return 1.0 - len(self._free) / (self.num_blocks - 1)

    @property
    def num_cached_hashes(self) -> int:
        """Distinct block hashes that can be hit now."""
        return len(self._cached)

    def cached_hashes(self) -> list[int]:
        """The hashes (as published in KV events) of every block that can be hit now, sorted."""
        return sorted(external_hash(d) for d in self._cached)

    def blocks_of(self, request_id: str) -> int:
        """How many blocks ``request_id`` holds."""
        holder = self._holders.get(request_id)
        return len(holder.blocks) if holder else 0

    def block_ids(self, request_id: str) -> list[int]:
        """The ids of the blocks ``request_id`` holds, in order (what NIXL sends)."""
        holder = self._holders.get(request_id)
        return [b.block_id for b in holder.blocks] if holder else []

    def digests(self, request_id: str, tokens: Sequence[int]) -> list[bytes]:
        """Return the digests of every full block of ``tokens`` (cached per request).

        Args:
            request_id: the request; its digests are extended as its tokens grow.
            tokens: all of the request's tokens so far (prompt, then output).

        Returns:
            The request's digest list (do not modify it).
        """
        holder = self._holders.setdefault(request_id, _Holder())
        digests = holder.digests
        size = self.block_size
        for i in range(len(digests), len(tokens) // size):
            parent = digests[i - 1] if i else None
            digests.append(hash_block(parent, tokens[i * size : (i + 1) * size], self.root))
        return digests

    def lookup(self, request_id: str, tokens: Sequence[int]) -> int:
        """Return how many leading tokens of ``tokens`` the cache holds (a block multiple).

        Capped at ``len(tokens) - 1``: vLLM always computes the last token. Changes nothing.
        """
        if not self.enable_caching:
            return 0
        digests = self.digests(request_id, tokens)
        limit = (len(tokens) - 1) // self.block_size
        hits = 0
        while hits < limit and digests[hits] in self._cached:
            hits += 1
        return hits * self.block_size

    # -- changes ------------------------------------------------------------------------------

    def allocate(
        self, request_id: str, tokens: Sequence[int], num_computed: int, num_new: int
    ) -> bool:
        """Give ``request_id`` the blocks for ``num_computed + num_new`` tokens, then cache the
        blocks those tokens fill, queueing BlockStored and BlockRemoved events.

        For a request holding no blocks yet, ``num_computed`` must be the :meth:`lookup` result:
        the hit blocks are taken (referenced) first, so allocation never evicts them.

        Args:
            request_id: the request.
            tokens: all its tokens so far.
            num_computed: tokens already computed (or hit) before this step.
            num_new: tokens this step computes.

        Returns:
            False, with nothing changed, when there are not enough free blocks.
        """
        holder = self._holders.setdefault(request_id, _Holder())
        size = self.block_size
        hit_blocks: list[_Block] = []
        if not holder.blocks and num_computed:
            digests = self.digests(request_id, tokens)
            for i in range(num_computed // size):
                hit_blocks.append(next(iter(self._cached[digests[i]].values())))
        owned = len(holder.blocks) + len(hit_blocks)
        needed = max(0, -(-(num_computed + num_new) // size) - owned)
        evictable_hits = sum(1 for b in hit_blocks if b.ref_cnt == 0)
        if needed > len(self._free) - evictable_hits:
            return False
        for block in hit_blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1
        holder.blocks.extend(hit_blocks)
        if hit_blocks:
            holder.num_cached_blocks = len(hit_blocks)
        for _ in range(needed):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            holder.blocks.append(block)
        if self.enable_caching:
            self._cache_full_blocks(request_id, holder, tokens, num_computed + num_new)
        return True

    def free(self, request_id: str) -> None:
        """Release every block of ``request_id`` (finished, aborted or preempted), tail first."""
        holder = self._holders.pop(request_id, None)
        if holder is None:
            return
        to_front: list[_Block] = []
        for block in reversed(holder.blocks):
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.digest is None or not self.enable_caching:
                    to_front.append(block)
                else:
                    self._free[block.block_id] = block
        for block in reversed(to_front):
            self._free[block.block_id] = block
            self._free.move_to_end(block.block_id, last=False)

    def reset(self) -> bool:
        """Drop every cached hash, as ``POST /reset_prefix_cache`` does.

        Returns:
            False (nothing changed) while any block is referenced; True after queueing
            ``AllBlocksCleared``.
        """
        if len(self._free) != self.num_blocks - 1:
            return False
        for block in self._blocks:
            block.digest = None
        self._cached.clear()
        if self.events_enabled:
            self._events.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[KVEvent]:
        """Return the queued KV events, oldest first, and clear the queue."""
        events, self._events = self._events, []
        return events

    # -- internals ----------------------------------------------------------------------------

    def _evict(self, block: _Block) -> None:
        digest = block.digest
        if digest is None:
            return
        block.digest = None
        holders = self._cached.get(digest)
        if holders is None or holders.pop(block.block_id, None) is None:
            return
        if not holders:
            del self._cached[digest]
        if self.events_enabled:
            self._events.append(BlockRemoved((external_hash(digest),), medium=MEDIUM_GPU))

    def _cache_full_blocks(
        self, request_id: str, holder: _Holder, tokens: Sequence[int], num_tokens: int
    ) -> None:
        size = self.block_size
        num_full = min(num_tokens, len(tokens)) // size
        first = holder.num_cached_blocks
        if num_full <= first:
            return
        digests = self.digests(request_id, tokens)
        for i in range(first, num_full):
            block = holder.blocks[i]
            block.digest = digests[i]
            self._cached.setdefault(digests[i], {})[block.block_id] = block
        holder.num_cached_blocks = num_full
        if self.events_enabled:
            self._events.append(
                BlockStored(
                    block_hashes=tuple(external_hash(d) for d in digests[first:num_full]),
                    parent_block_hash=external_hash(digests[first - 1]) if first else None,
                    token_ids=tuple(tokens[first * size : num_full * size]),
                    block_size=size,
                    lora_name=None,
                    medium=MEDIUM_GPU,
                )
            )


__all__ = ["MEDIUM_GPU", "PrefixCache", "external_hash", "hash_block", "none_hash"]
