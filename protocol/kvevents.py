"""Fleet's own representation of KV-cache events.

These mirror vLLM's ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``
(vllm/distributed/kv_events.py) with only the fields Fleet uses. Block hashes are opaque: vLLM
publishes a uint64 by default, or raw digest bytes (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0``).
:mod:`fleet.protocol.vllm_events` decodes vLLM's wire format into these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

BlockHash = int | bytes


@dataclass(frozen=True)
class BlockStored:
    """Full blocks an engine has cached; ``token_ids`` covers all of them in order."""

    TYPE: ClassVar[str] = "BlockStored"
    block_hashes: tuple[BlockHash, ...]
    parent_block_hash: BlockHash | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_name: str | None = None
    medium: str | None = None


@dataclass(frozen=True)
class BlockRemoved:
    """Blocks an engine evicted."""

    TYPE: ClassVar[str] = "BlockRemoved"
    block_hashes: tuple[BlockHash, ...]
    medium: str | None = None


@dataclass(frozen=True)
class AllBlocksCleared:
    """The engine dropped its whole prefix cache."""

    TYPE: ClassVar[str] = "AllBlocksCleared"


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared

KV_EVENT_TYPES: dict[str, type[KVEvent]] = {
    cls.TYPE: cls for cls in (BlockStored, BlockRemoved, AllBlocksCleared)
}

__all__ = [
    "KV_EVENT_TYPES",
    "AllBlocksCleared",
    "BlockHash",
    "BlockRemoved",
    "BlockStored",
    "KVEvent",
]
