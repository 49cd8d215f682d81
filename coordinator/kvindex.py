"""The global KV-block index, built from the engines' relayed KV events.

Sans-I/O. Blocks are keyed on content, not on the engine's hashes: Fleet chains its own 64-bit
key over token ids (``key = H(parent_key, block tokens)``, rooted per model), so the index is
right whatever hash algorithm or seed an engine uses. Each engine keeps a map from its own block
hash to Fleet's key, which is how ``BlockRemoved`` is applied.

Sequence numbers are checked per engine: a duplicate or older batch is skipped, a batch numbered
0 after others means the engine restarted (its entries are dropped first), and a gap is counted
(repairing gaps from the engine's replay socket comes with the routing work).
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from fleet.protocol.kvevents import AllBlocksCleared, BlockHash, BlockRemoved, BlockStored, KVEvent


def root_key(model: str, lora: str | None = None) -> int:
    """Return the chain root for a model (and LoRA adapter)."""
    digest = hashlib.blake2b(f"fleet/{model}/{lora or ''}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def chain_key(parent: int, tokens: Sequence[int]) -> int:
    """Return Fleet's key of a block given its parent's key and its token ids."""
    payload = struct.pack(f">Q{len(tokens)}I", parent, *tokens)
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "big")


def block_keys(model: str, token_ids: Sequence[int], block_size: int) -> list[int]:
    """Return the keys of every full block of a token sequence, in order."""
    keys = []
    parent = root_key(model)
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = chain_key(parent, token_ids[start : start + block_size])
        keys.append(parent)
    return keys


@dataclass
class EngineEntry:
    """What the index knows of one engine."""

    model: str
    next_seq: int = 0
    blocks: dict[BlockHash, int] = field(default_factory=dict)  # engine hash -> Fleet key
    # Fleet key -> how many engine hashes map to it (same tokens, other extra keys such as a
    # cache salt): the engine holds the key until the last of them is removed.
    refs: Counter[int] = field(default_factory=Counter)
    events: int = 0
    batches: int = 0


class KVIndex:
    """Which engine holds which block, by content."""

    def __init__(self) -> None:
        self._engines: dict[str, EngineEntry] = {}
        self._holders: dict[int, set[str]] = {}
        self.stats: Counter[str] = Counter()

    def apply(self, engine_id: str, model: str, seq: int, events: Iterable[KVEvent]) -> bool:
        """Apply one relayed batch. Returns False if it was skipped as a duplicate."""
        entry = self._engines.get(engine_id)
        if entry is None or entry.model != model:
            if entry is not None:
                self.drop_engine(engine_id)
            entry = self._engines[engine_id] = EngineEntry(model=model)
        if seq < entry.next_seq:
            if seq == 0:
                self.stats["restarts"] += 1
                self._clear(engine_id, entry)
            else:
                self.stats["duplicates"] += 1
                return False
        elif seq > entry.next_seq:
            self.stats["gaps"] += 1
        entry.next_seq = seq + 1
        entry.batches += 1
        for event in events:
            entry.events += 1
            self.stats["events"] += 1
            if isinstance(event, BlockStored):
                self._stored(engine_id, entry, event)
            elif isinstance(event, BlockRemoved):
                for h in event.block_hashes:
                    self._remove(engine_id, entry, h)
            elif isinstance(event, AllBlocksCleared):
                self._clear(engine_id, entry)
        return True

    def drop_engine(self, engine_id: str) -> None:
        """Forget an engine (it left, or its state can no longer be trusted)."""
        entry = self._engines.pop(engine_id, None)
        if entry is not None:
            self._clear(engine_id, entry)

    def _stored(self, engine_id: str, entry: EngineEntry, event: BlockStored) -> None:
        size = event.block_size
        if size <= 0 or len(event.token_ids) < size * len(event.block_hashes):
            self.stats["malformed"] += 1
            return
        if event.parent_block_hash is None:
            parent = root_key(entry.model, event.lora_name)
        else:
            known = entry.blocks.get(event.parent_block_hash)
            if known is None:
                self.stats["orphans"] += 1
                return
            parent = known
        for i, engine_hash in enumerate(event.block_hashes):
            parent = chain_key(parent, event.token_ids[i * size : (i + 1) * size])
            old = entry.blocks.get(engine_hash)
            if old == parent:
                continue
            if old is not None:
                self._release(engine_id, entry, old)
            entry.blocks[engine_hash] = parent
            entry.refs[parent] += 1
            self._holders.setdefault(parent, set()).add(engine_id)

    def _remove(self, engine_id: str, entry: EngineEntry, engine_hash: BlockHash) -> None:
        key = entry.blocks.pop(engine_hash, None)
        if key is not None:
            self._release(engine_id, entry, key)

    def _release(self, engine_id: str, entry: EngineEntry, key: int) -> None:
        entry.refs[key] -= 1
        if entry.refs[key] <= 0:
            del entry.refs[key]
            self._unhold(engine_id, key)

    def _unhold(self, engine_id: str, key: int) -> None:
        holders = self._holders.get(key)
        if holders is not None:
            holders.discard(engine_id)
            if not holders:
                del self._holders[key]

    def _clear(self, engine_id: str, entry: EngineEntry) -> None:
        for key in entry.refs:
            self._unhold(engine_id, key)
        entry.blocks.clear()
        entry.refs.clear()

    # -- queries -----------------------------------------------------------------------------

    def engine(self, engine_id: str) -> EngineEntry | None:
        return self._engines.get(engine_id)

    def engine_keys(self, engine_id: str) -> set[int]:
        entry = self._engines.get(engine_id)
        return set(entry.blocks.values()) if entry else set()

    def match(self, keys: Sequence[int], candidates: Iterable[str]) -> dict[str, int]:
        """Return, per candidate engine, how many leading blocks of ``keys`` it holds."""
        out = {}
        for engine_id in candidates:
            n = 0
            for key in keys:
                if engine_id not in self._holders.get(key, ()):
                    break
                n += 1
            out[engine_id] = n
        return out

    def block_count(self) -> int:
        return len(self._holders)

    def engine_ids(self) -> list[str]:
        return sorted(self._engines)


__all__ = ["EngineEntry", "KVIndex", "block_keys", "chain_key", "root_key"]
