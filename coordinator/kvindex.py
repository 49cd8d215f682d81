"""The global KV-block index, built from the engines' relayed KV events.

Sans-I/O. Blocks are keyed on content, not on the engine's hashes: Fleet chains its own 64-bit
key over token ids (``key = H(parent_key, block tokens)``, rooted per model), so the index is
right whatever hash algorithm or seed an engine uses. Each engine keeps a map from its own block
hash to Fleet's key, which is how ``BlockRemoved`` is applied.

Sequence numbers are checked per engine, and batches are applied once and in order:

- a duplicate (a number already applied or already waiting) is skipped;
- a batch numbered 0 after others means the engine restarted: its entries are dropped first;
- a batch past a gap waits (the agent repairs gaps from the engine's replay socket, so the missing
  ones normally follow); when ``reorder_window`` batches wait, or the oldest gap is older than
  ``gap_timeout_s`` (:meth:`KVIndex.expire`), the engine is *resynced*: its entries are dropped
  and rebuilt from the waiting batches on;
- a batch flagged ``resync`` (the agent lost events its engine's replay buffer no longer held)
  resyncs the engine too.

So the index never reports a block an engine no longer has for longer than one resync. Memory is
bounded: past ``max_entries`` (block, engine) entries new blocks are not indexed (counted as
``capped``) until others leave: the index under-reports, never over-reports.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
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
    """Return the keys of every full block of a token sequence, in order.

    The same keys as chaining :func:`chain_key` from :func:`root_key`.
    """
    return list(BlockKeys(model, token_ids, block_size))


class BlockKeys:
    """A prompt's block keys, computed only as far as they are read (and then kept).

    Matching stops at the first block no candidate holds, so the blocks after the longest cached
    prefix of a long prompt are never hashed. ``len()`` is the number of full blocks.
    """

    def __init__(self, model: str, token_ids: Sequence[int], block_size: int) -> None:
        self.block_size = block_size
        self._n = len(token_ids) // block_size
        self._tokens = token_ids
        self._packed: bytes | None = None
        self._keys: list[int] = []
        self._parent = root_key(model) if self._n else 0

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[int]:
        i = 0
        while i < self._n:
            if i == len(self._keys):
                self._grow(i + 32)
            yield self._keys[i]
            i += 1

    def _grow(self, upto: int) -> None:
        upto = min(upto, self._n)
        width = 4 * self.block_size
        if self._packed is None:
            count = self._n * self.block_size
            self._packed = struct.pack(f">{count}I", *self._tokens[:count])
        packed, parent, keys = self._packed, self._parent, self._keys
        blake2b, pack_parent, from_bytes = hashlib.blake2b, _PARENT.pack, int.from_bytes
        for start in range(len(keys) * width, upto * width, width):
            digest = blake2b(pack_parent(parent) + packed[start : start + width], digest_size=8)
            parent = from_bytes(digest.digest(), "big")
            keys.append(parent)
        self._parent = parent

    def head(self, n: int | None) -> Iterator[int]:
        """The first ``n`` keys (all when None)."""
        return iter(self) if n is None or n >= self._n else itertools.islice(self, n)


_PARENT = struct.Struct(">Q")


@dataclass
class EngineEntry:
    """What the index knows of one engine."""

    model: str
    next_seq: int = 0
    blocks: dict[BlockHash, int] = field(default_factory=dict)  # engine hash -> Fleet key
    # Fleet key -> how many *more* engine hashes map to it than the first (same tokens, other
    # extra keys such as a cache salt): the engine holds the key until the last is removed.
    # Almost always empty, so a key costs the index nothing here.
    extra_refs: dict[int, int] = field(default_factory=dict)
    events: int = 0
    batches: int = 0
    started: bool = False  # a batch was applied (next_seq is meaningful)
    pending: dict[int, tuple[KVEvent, ...]] = field(default_factory=dict)  # seq -> events
    gap_since: float | None = None


DEFAULT_MAX_ENTRIES = 5_000_000
DEFAULT_REORDER_WINDOW = 256
DEFAULT_GAP_TIMEOUT_S = 2.0


class KVIndex:
    """Which engine holds which block, by content.

    Args:
        max_entries: the most (block, engine) entries held.
        reorder_window: batches one engine may have waiting behind a gap.
        gap_timeout_s: how long a gap may stay open before the engine is resynced.
    """

    def __init__(
        self,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        reorder_window: int = DEFAULT_REORDER_WINDOW,
        gap_timeout_s: float = DEFAULT_GAP_TIMEOUT_S,
    ) -> None:
        self.max_entries = max_entries
        self.reorder_window = reorder_window
        self.gap_timeout_s = gap_timeout_s
        self._engines: dict[str, EngineEntry] = {}
        # Fleet key -> the engine holding it, or a set when several do: most blocks have one
        # holder, and a shared string costs nothing where a set costs ~200 bytes.
        self._holders: dict[int, str | set[str]] = {}
        self.entries = 0
        self.stats: Counter[str] = Counter()

    def apply(
        self,
        engine_id: str,
        model: str,
        seq: int,
        events: Iterable[KVEvent],
        *,
        resync: bool = False,
        now: float = 0.0,
    ) -> str:
        """Apply one relayed batch (or hold it behind a gap).

        Returns:
            ``applied``, ``duplicate``, ``waiting`` (behind a gap), ``restart`` or ``resync``
            (applied after dropping the engine's entries).
        """
        entry = self._entry(engine_id, model)
        batch = tuple(events)
        outcome = "applied"
        if resync:
            self.stats["resyncs"] += 1
            self._resync(engine_id, entry, seq)
            outcome = "resync"
        elif seq == 0 and entry.started and entry.next_seq > 0:
            self.stats["restarts"] += 1
            self._resync(engine_id, entry, 0)
            outcome = "restart"
        elif not entry.started:
            entry.next_seq = seq  # the first batch seen sets the sequence
        elif seq < entry.next_seq or seq in entry.pending:
            self.stats["duplicates"] += 1
            return "duplicate"
        elif seq > entry.next_seq:
            if not entry.pending:
                self.stats["gaps"] += 1
                entry.gap_since = now
            entry.pending[seq] = batch
            if len(entry.pending) > self.reorder_window:
                self.stats["resyncs"] += 1
                self._resync(engine_id, entry, min(entry.pending))
                self._drain(engine_id, entry)
            return "waiting"
        self._apply(engine_id, entry, seq, batch)
        self._drain(engine_id, entry)
        return outcome

    def load_snapshot(
        self, engine_id: str, model: str, seq: int, events: Iterable[KVEvent], *, first: bool
    ) -> None:
        """Apply one part of an agent's snapshot of the engine's blocks as of batch ``seq``
        (-1: before any). The first part replaces what the index knows of the engine; batches
        after ``seq`` then continue it, older ones are duplicates."""
        entry = self._entry(engine_id, model)
        if first:
            self.stats["snapshots"] += 1
            self._clear(engine_id, entry)
            entry.pending = {s: b for s, b in entry.pending.items() if s > seq}
            entry.next_seq = seq + 1
            entry.started = seq >= 0
            entry.gap_since = None
        for event in events:
            if isinstance(event, BlockStored):
                self._stored(engine_id, entry, event)
            elif isinstance(event, BlockRemoved):  # ghosts: evicted parents of cached blocks
                for h in event.block_hashes:
                    self._remove(engine_id, entry, h)
        self._drain(engine_id, entry)

    def engine_block_count(self, engine_id: str) -> int:
        """How many blocks the index holds for the engine."""
        entry = self._engines.get(engine_id)
        return len(entry.blocks) if entry else 0

    def _entry(self, engine_id: str, model: str) -> EngineEntry:
        """The engine's entry; a new one if it is unknown or now serves another model."""
        entry = self._engines.get(engine_id)
        if entry is None or entry.model != model:
            if entry is not None:
                self.drop_engine(engine_id)
            entry = self._engines[engine_id] = EngineEntry(model=model)
        return entry

    def expire(self, now: float) -> list[str]:
        """Resync every engine whose oldest gap is older than ``gap_timeout_s``; return them."""
        expired = []
        for engine_id, entry in self._engines.items():
            if entry.pending and entry.gap_since is not None:
                if now - entry.gap_since >= self.gap_timeout_s:
                    self.stats["resyncs"] += 1
                    self._resync(engine_id, entry, min(entry.pending))
                    self._drain(engine_id, entry)
                    expired.append(engine_id)
        return expired

    def _resync(self, engine_id: str, entry: EngineEntry, seq: int) -> None:
        """Drop the engine's entries; continue from ``seq`` (waiting batches from it on stay)."""
        self._clear(engine_id, entry)
        entry.pending = {s: b for s, b in entry.pending.items() if s >= seq}
        entry.next_seq = seq
        entry.gap_since = None

    def _drain(self, engine_id: str, entry: EngineEntry) -> None:
        while entry.next_seq in entry.pending:
            seq = entry.next_seq
            self._apply(engine_id, entry, seq, entry.pending.pop(seq))
        entry.gap_since = None if not entry.pending else entry.gap_since

    def _apply(
        self, engine_id: str, entry: EngineEntry, seq: int, events: tuple[KVEvent, ...]
    ) -> None:
        entry.started = True
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
            if self._holds(engine_id, parent):
                entry.extra_refs[parent] = entry.extra_refs.get(parent, 0) + 1
            elif self.entries >= self.max_entries:
                self.stats["capped"] += 1
                return  # not indexed: its children would chain off a block the index lacks
            else:
                self._hold(engine_id, parent)
            entry.blocks[engine_hash] = parent

    def _remove(self, engine_id: str, entry: EngineEntry, engine_hash: BlockHash) -> None:
        key = entry.blocks.pop(engine_hash, None)
        if key is not None:
            self._release(engine_id, entry, key)

    def _release(self, engine_id: str, entry: EngineEntry, key: int) -> None:
        extra = entry.extra_refs.get(key)
        if extra:
            if extra == 1:
                del entry.extra_refs[key]
            else:
                entry.extra_refs[key] = extra - 1
        else:
            self._unhold(engine_id, key)

    def _holds(self, engine_id: str, key: int) -> bool:
        holders = self._holders.get(key)
        if holders is None:
            return False
        return holders == engine_id if isinstance(holders, str) else engine_id in holders

    def _hold(self, engine_id: str, key: int) -> None:
        holders = self._holders.get(key)
        if holders is None:
            self._holders[key] = engine_id
        elif isinstance(holders, str):
            self._holders[key] = {holders, engine_id}
        else:
            holders.add(engine_id)
        self.entries += 1

    def _unhold(self, engine_id: str, key: int) -> None:
        holders = self._holders.get(key)
        if holders is None:
            return
        if isinstance(holders, str):
            if holders == engine_id:
                del self._holders[key]
                self.entries -= 1
        elif engine_id in holders:
            holders.discard(engine_id)
            self.entries -= 1
            if len(holders) == 1:
                self._holders[key] = next(iter(holders))

    def _clear(self, engine_id: str, entry: EngineEntry) -> None:
        for key in set(entry.blocks.values()):
            self._unhold(engine_id, key)
        entry.blocks.clear()
        entry.extra_refs.clear()

    # -- queries -----------------------------------------------------------------------------

    def engine(self, engine_id: str) -> EngineEntry | None:
        return self._engines.get(engine_id)

    def engine_keys(self, engine_id: str) -> set[int]:
        entry = self._engines.get(engine_id)
        return set(entry.blocks.values()) if entry else set()

    def match(self, keys: Iterable[int], candidates: Iterable[str]) -> dict[str, int]:
        """Return, per candidate engine, how many leading blocks of ``keys`` it holds.

        One walk along ``keys``, narrowing the set of engines still matching: the cost is the
        longest match's length plus the number of candidates, not their product.
        """
        out = dict.fromkeys(candidates, 0)
        alive = set(out)
        holders_of = self._holders
        depth = 0  # blocks every engine in ``alive`` holds
        for key in keys:
            holders = holders_of.get(key)
            if holders is None:
                break
            if isinstance(holders, str):
                if holders not in alive:
                    break
                if len(alive) > 1:
                    for engine_id in alive:
                        out[engine_id] = depth
                    alive = {holders}
            elif not alive <= holders:
                for engine_id in alive - holders:
                    out[engine_id] = depth
                alive &= holders
                if not alive:
                    return out
            depth += 1
        for engine_id in alive:
            out[engine_id] = depth
        return out

    def block_count(self) -> int:
        return len(self._holders)

    def engine_count(self) -> int:
        return len(self._engines)

    def engine_ids(self) -> list[str]:
        return sorted(self._engines)


__all__ = ["BlockKeys", "EngineEntry", "KVIndex", "block_keys", "chain_key", "root_key"]
