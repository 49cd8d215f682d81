"""Fleet's content keys of KV blocks, computed from token ids.

Blocks are keyed on content, not on an engine's hashes: Fleet chains its own 64-bit key over
token ids (``key = H(parent_key, block tokens)``, rooted per model and LoRA adapter), so the KV
index (:mod:`fleet.coordinator.kvindex`) is right whatever hash algorithm or seed an engine uses.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections.abc import Iterator, Sequence


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


__all__ = ["BlockKeys", "block_keys", "chain_key", "root_key"]
