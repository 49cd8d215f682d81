"""Encode vLLM's own KV-event stream: the simulator's PUB batches and the relay's replay requests.

The frames are those vLLM 0.32.0's ``ZmqEventPublisher`` sends and its replay socket expects
(``vllm/distributed/kv_events.py``); :mod:`fleet.protocol.vllm_events` documents the format and
decodes it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

import msgpack

from .kvevents import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

_SEQ_LIMIT: Final[int] = 1 << 64


def encode_replay_request(start_seq: int) -> list[bytes]:
    """Return the frames a DEALER sends to ask for every buffered batch from ``start_seq`` on.

    Args:
        start_seq: the first sequence number wanted (0 <= start_seq < 2**64).

    Returns:
        ``[b"", start_seq as 8 bytes big-endian]``.

    Raises:
        ValueError: ``start_seq`` is not an int in range.
    """
    return [b"", _seq_bytes(start_seq, "start_seq")]


def encode_vllm_message(
    topic: str,
    seq: int,
    ts: float,
    events: Iterable[KVEvent],
    dp_rank: int = 0,
    *,
    group_idx: int | None = None,
    kv_cache_spec_kind: str | None = None,
) -> list[bytes]:
    """Return the frames vLLM 0.32's ``ZmqEventPublisher`` sends for the same batch.

    The payload is byte-identical to ``msgspec.msgpack.Encoder().encode(KVEventBatch(...))``
    with ``lora_id=None`` (Fleet does not keep it) and, by default, no optional fields. With
    ``group_idx`` set, events also carry what the scheduler adds for a plain full-attention
    request (``vllm/v1/core/block_pool.py``, ``kv_cache_manager.py``): ``extra_keys`` (one
    ``None`` per block, or ``(lora_name,)`` when ``lora_name`` is set), ``group_idx`` and, when
    given, ``kv_cache_spec_kind`` on BlockStored; ``group_idx`` on BlockRemoved.

    Args:
        topic: the publisher's topic.
        seq: the sequence number (0 <= seq < 2**64).
        ts: the batch timestamp (seconds since the epoch).
        events: the events, in order.
        dp_rank: the data-parallel rank the publisher fills in.
        group_idx: the KV-cache group index to annotate events with, or None for none.
        kv_cache_spec_kind: e.g. ``"full_attention"``; only sent when ``group_idx`` is set.

    Returns:
        ``[topic (utf-8), seq (8 bytes big-endian), msgpack payload]``.

    Raises:
        ValueError: ``seq`` out of range or ``dp_rank`` negative.
        TypeError: an event that is not a Fleet KV event.
    """
    if type(dp_rank) is not int or dp_rank < 0:
        raise ValueError(f"dp_rank must be a non-negative int, got {dp_rank!r}")
    wire_events = [_event_to_wire(ev, group_idx, kv_cache_spec_kind) for ev in events]
    payload: bytes = msgpack.packb([float(ts), wire_events, dp_rank], use_bin_type=True)
    return [topic.encode("utf-8"), _seq_bytes(seq, "seq"), payload]


def _seq_bytes(value: int, name: str) -> bytes:
    if type(value) is not int or not 0 <= value < _SEQ_LIMIT:
        raise ValueError(f"{name} must be an int in [0, 2**64), got {value!r}")
    return value.to_bytes(8, "big")


def _event_to_wire(event: KVEvent, group_idx: int | None, spec_kind: str | None) -> dict[str, Any]:
    # Key order and omitted defaults follow the msgspec structs: "type" first, then the fields
    # in declaration order; required fields always, defaulted ones only when not None.
    if isinstance(event, BlockStored):
        out: dict[str, Any] = {
            "type": "BlockStored",
            "block_hashes": list(event.block_hashes),
            "parent_block_hash": event.parent_block_hash,
            "token_ids": list(event.token_ids),
            "block_size": event.block_size,
            "lora_id": None,
            "medium": event.medium,
            "lora_name": event.lora_name,
        }
        if group_idx is not None:
            if event.block_hashes:  # to_event_extra_keys() gives None for no blocks
                per_block = (event.lora_name,) if event.lora_name is not None else None
                out["extra_keys"] = [per_block] * len(event.block_hashes)
            out["group_idx"] = group_idx
            if spec_kind is not None:
                out["kv_cache_spec_kind"] = spec_kind
        return out
    if isinstance(event, BlockRemoved):
        out = {
            "type": "BlockRemoved",
            "block_hashes": list(event.block_hashes),
            "medium": event.medium,
        }
        if group_idx is not None:
            out["group_idx"] = group_idx
        return out
    if isinstance(event, AllBlocksCleared):
        return {"type": "AllBlocksCleared"}
    raise TypeError(f"not a KV event: {event!r:.80}")


__all__ = ["encode_replay_request", "encode_vllm_message"]
