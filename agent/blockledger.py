"""The blocks one engine holds now, kept by the agent from the KV events it relays.

A coordinator that (re)connects (restarted, or failed over) gets each engine's block set as a
snapshot instead of waiting for traffic to rebuild its index (shared/DESIGN.md): a restarted
coordinator routes with a full index within seconds and no engine restarts. The ledger follows
the relayed batches exactly as the coordinator's index does: BlockStored adds, BlockRemoved
removes, AllBlocksCleared, an engine restart (batch 0) and a resync empty it.

Token ids are kept as 32-bit arrays (4 bytes a token, not a Python int each).
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from fleet.protocol.kvevents import AllBlocksCleared, BlockHash, BlockRemoved, BlockStored, KVEvent

SNAPSHOT_PART_BLOCKS = 1024
"""Blocks per snapshot message: a coordinator applies one part between other work."""


@dataclass(frozen=True, slots=True)
class _Block:
    parent: BlockHash | None
    tokens: array[int]
    lora_name: str | None
    medium: str | None


class BlockLedger:
    """One engine's current blocks, in the order they were stored (parents before children).

    An evicted block whose children are still cached stays as a *ghost*: the children's content
    keys chain through its tokens, so a snapshot stores it, then removes it, as the live events
    did. A ghost goes when its last child goes.
    """

    def __init__(self) -> None:
        self._blocks: dict[BlockHash, _Block] = {}  # held blocks and ghosts
        self._ghosts: set[BlockHash] = set()
        self._children: Counter[BlockHash] = Counter()
        self.seq = -1  # the last batch applied; -1: none

    def __len__(self) -> int:
        return len(self._blocks) - len(self._ghosts)

    def apply(self, seq: int, events: Iterable[KVEvent], *, reset: bool = False) -> None:
        """Apply relayed batch ``seq``; ``reset`` (a resync or a restarted engine) empties the
        ledger first."""
        if reset or seq == 0:
            self._clear()
        self.seq = seq
        for event in events:
            if isinstance(event, BlockStored):
                self._store(event)
            elif isinstance(event, BlockRemoved):
                for block_hash in event.block_hashes:
                    self._remove(block_hash)
            elif isinstance(event, AllBlocksCleared):
                self._clear()

    def _clear(self) -> None:
        self._blocks.clear()
        self._ghosts.clear()
        self._children.clear()

    def _store(self, event: BlockStored) -> None:
        size = event.block_size
        if size <= 0 or len(event.token_ids) < size * len(event.block_hashes):
            return  # malformed: the coordinator skips it too
        parent = event.parent_block_hash
        for i, block_hash in enumerate(event.block_hashes):
            if block_hash in self._blocks:  # stored again (same content): held again, in place
                self._ghosts.discard(block_hash)
            else:
                tokens = array("I", event.token_ids[i * size : (i + 1) * size])
                self._blocks[block_hash] = _Block(parent, tokens, event.lora_name, event.medium)
                if parent is not None and parent in self._blocks:
                    self._children[parent] += 1
            parent = block_hash

    def _remove(self, block_hash: BlockHash) -> None:
        if block_hash not in self._blocks or block_hash in self._ghosts:
            return
        if self._children[block_hash]:
            self._ghosts.add(block_hash)
            return
        while True:  # drop it, then each ghost ancestor left without children
            block = self._blocks.pop(block_hash)
            self._children.pop(block_hash, None)
            self._ghosts.discard(block_hash)
            parent = block.parent
            if parent is None or parent not in self._blocks:
                return
            self._children[parent] -= 1
            if self._children[parent] or parent not in self._ghosts:
                return
            block_hash = parent

    def snapshot(self, part_blocks: int = SNAPSHOT_PART_BLOCKS) -> list[tuple[KVEvent, ...]]:
        """The ledger as BlockStored events, in parts of at most ``part_blocks`` blocks (a run
        of blocks each the child of the one before is one event), the ghosts removed at the
        end."""
        parts: list[tuple[KVEvent, ...]] = []
        part: list[KVEvent] = []
        in_part = 0
        for event in self._events(part_blocks):
            if in_part + len(event.block_hashes) > part_blocks and part:
                parts.append(tuple(part))
                part, in_part = [], 0
            part.append(event)
            in_part += len(event.block_hashes)
        if self._ghosts:
            part.append(BlockRemoved(tuple(h for h in self._blocks if h in self._ghosts)))
        if part:
            parts.append(tuple(part))
        return parts

    def _events(self, most: int) -> Iterator[BlockStored]:
        run: list[BlockHash] = []
        first: _Block | None = None
        tokens = array("I")
        for block_hash, block in self._blocks.items():
            continues = (
                first is not None
                and run
                and block.parent == run[-1]
                and len(block.tokens) == len(first.tokens)
                and block.lora_name == first.lora_name
                and block.medium == first.medium
                and len(run) < most
            )
            if not continues and first is not None:
                yield _stored(run, first, tokens)
                run, tokens = [], array("I")
            if not continues:
                first = block
            run.append(block_hash)
            tokens.extend(block.tokens)
        if first is not None:
            yield _stored(run, first, tokens)


def _stored(run: list[BlockHash], first: _Block, tokens: array[int]) -> BlockStored:
    return BlockStored(
        block_hashes=tuple(run),
        parent_block_hash=first.parent,
        token_ids=tuple(tokens),
        block_size=len(first.tokens),
        lora_name=first.lora_name,
        medium=first.medium,
    )


__all__ = ["SNAPSHOT_PART_BLOCKS", "BlockLedger"]
