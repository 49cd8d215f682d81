"""The global KV-block index, built from the engines' relayed KV events.

Sans-I/O. Blocks are keyed on content, not on the engine's hashes: Fleet chains its own 64-bit
key over token ids (``key = H(parent_key, block tokens)``, rooted per model), so the index is
right whatever hash algorithm or seed an engine uses. Each engine keeps a map from its own block
hash to Fleet's key, which is how ``BlockRemoved`` is applied.

Sequence numbers are checked per engine (:class:`~fleet.protocol.sequence.SequenceTracker`, the
same rules as the agent's relay), and batches are applied once and in order:

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

Every removal of an engine's entries, whoever decides it (the index itself on a restart or
resync, the agent link when an engine leaves or moves, upkeep when a node is lost), goes through
:meth:`KVIndex.drop_engine` or the index's own resync, and is counted by reason in
:attr:`KVIndex.drops` (``fleet_kv_engine_drops_total``); only an engine's own
``AllBlocksCleared`` event empties it otherwise.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, get_args

from fleet.protocol.kvevents import AllBlocksCleared, BlockHash, BlockRemoved, BlockStored, KVEvent
from fleet.protocol.sequence import Order, SequenceTracker

from .blockkeys import BlockKeys, block_keys, chain_key, root_key

DropReason = Literal[
    "restart",  # the engine's batches began again at 0
    "resync",  # the agent lost batches the engine's replay buffer no longer held
    "gap_timeout",  # a gap stayed open past gap_timeout_s
    "reorder_window",  # more batches waited behind a gap than reorder_window
    "snapshot",  # an agent's snapshot of the engine replaces what the index knew
    "model_changed",  # the engine id now serves another model
    "node_lost",  # its node stopped sending heartbeats
    "engine_gone",  # its node no longer reports it
    "engine_restarted",  # its node reports a new process (an empty cache)
    "second_copy",  # it runs on two nodes; the copy not routed is being stopped
    "relocated",  # stopped to move it off an unhealthy GPU
    "crash_loop",  # stopped to move it off a node where it keeps crashing
]
DROP_REASONS: frozenset[str] = frozenset(get_args(DropReason))


@dataclass
class EngineEntry:
    """What the index knows of one engine."""

    model: str
    seqs: SequenceTracker[tuple[KVEvent, ...]]  # its sequence; batches waiting behind a gap
    blocks: dict[BlockHash, int] = field(default_factory=dict)  # engine hash -> Fleet key
    # Fleet key -> how many *more* engine hashes map to it than the first (same tokens, other
    # extra keys such as a cache salt): the engine holds the key until the last is removed.
    # Almost always empty, so a key costs the index nothing here.
    extra_refs: dict[int, int] = field(default_factory=dict)
    events: int = 0
    batches: int = 0

    @property
    def next_seq(self) -> int:
        """The batch number expected next."""
        return self.seqs.next_seq

    @property
    def pending(self) -> dict[int, tuple[KVEvent, ...]]:
        """Batches waiting behind a gap: seq -> events."""
        return self.seqs.held


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
        self.drops: Counter[str] = Counter()  # engines' entries dropped, by DropReason

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
        seqs = entry.seqs
        batch = tuple(events)
        outcome = "applied"
        order = Order.NEXT if resync else seqs.classify(seq).order
        if resync:
            self.stats["resyncs"] += 1
            self._resync(engine_id, entry, seq, "resync")
            outcome = "resync"
        elif order is Order.RESTART:
            self.stats["restarts"] += 1
            self._drop_blocks(engine_id, entry, "restart")
            seqs.restart()
            outcome = "restart"
        elif order is Order.DUPLICATE:
            self.stats["duplicates"] += 1
            return "duplicate"
        elif order is Order.GAP:
            if not seqs.held:
                self.stats["gaps"] += 1
            seqs.hold(seq, batch, now)
            if seqs.overflowing:
                self.stats["resyncs"] += 1
                self._resync(engine_id, entry, seqs.oldest_held(), "reorder_window")
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
            self._drop_blocks(engine_id, entry, "snapshot")
            entry.seqs.load(seq)
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
                self.drop_engine(engine_id, "model_changed")
            seqs: SequenceTracker[tuple[KVEvent, ...]] = SequenceTracker(
                first=None, reorder_window=self.reorder_window, gap_timeout_s=self.gap_timeout_s
            )
            entry = self._engines[engine_id] = EngineEntry(model=model, seqs=seqs)
        return entry

    def expire(self, now: float) -> list[str]:
        """Resync every engine whose oldest gap is older than ``gap_timeout_s``; return them."""
        expired = []
        for engine_id, entry in self._engines.items():
            if entry.seqs.overdue(now):
                self.stats["resyncs"] += 1
                self._resync(engine_id, entry, entry.seqs.oldest_held(), "gap_timeout")
                self._drain(engine_id, entry)
                expired.append(engine_id)
        return expired

    def _resync(self, engine_id: str, entry: EngineEntry, seq: int, reason: DropReason) -> None:
        """Drop the engine's entries; continue from ``seq`` (waiting batches from it on stay)."""
        self._drop_blocks(engine_id, entry, reason)
        entry.seqs.expect(seq)

    def _drain(self, engine_id: str, entry: EngineEntry) -> None:
        for seq, events in entry.seqs.take_ready():
            self._apply(engine_id, entry, seq, events)

    def _apply(
        self, engine_id: str, entry: EngineEntry, seq: int, events: tuple[KVEvent, ...]
    ) -> None:
        entry.seqs.advance(seq)
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

    def drop_engine(self, engine_id: str, reason: DropReason) -> None:
        """Forget an engine (it left, or its state can no longer be trusted): the one way its
        entries leave the index from outside, counted in :attr:`drops` when it had any entry.

        Raises:
            ValueError: ``reason`` is not one of :data:`DROP_REASONS`.
        """
        if reason not in DROP_REASONS:
            raise ValueError(f"reason: {reason!r} is not one of {sorted(DROP_REASONS)}")
        entry = self._engines.pop(engine_id, None)
        if entry is not None:
            self._drop_blocks(engine_id, entry, reason)

    def _drop_blocks(self, engine_id: str, entry: EngineEntry, reason: DropReason) -> None:
        """Remove every entry of the engine, counting why."""
        self.drops[reason] += 1
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


__all__ = [
    "DROP_REASONS",
    "BlockKeys",
    "DropReason",
    "EngineEntry",
    "KVIndex",
    "block_keys",
    "chain_key",
    "root_key",
]
