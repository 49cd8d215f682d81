"""Decode vLLM's own KV-event stream (:mod:`fleet.protocol.vllm_events_encode` writes it).

Ground truth: vllm 0.32.0, ``vllm/distributed/kv_events.py`` (``ZmqEventPublisher``, the
``msgspec`` structs ``KVEventBatch``, ``BlockStored``, ``BlockRemoved``, ``AllBlocksCleared``).

PUB stream, one message per engine step with events::

    [topic (utf-8, often b""), seq (8 bytes big-endian, 0 at start, +1 per batch), payload]

``payload`` is a msgpack **array** (``array_like`` struct) ``[ts: float, events: array,
data_parallel_rank: int | nil]``; the publisher fills the rank, older producers may leave it nil
or out (both read as 0). Later trailing elements, should a newer vLLM add any, are ignored.

Each event is, in vLLM 0.32, a msgpack **map** (``tag=True``, ``omit_defaults``) whose first key is
``"type"``; required struct fields are always present (maybe nil), defaulted ones only when set::

    {"type": "BlockStored", "block_hashes", "parent_block_hash", "token_ids", "block_size",
     "lora_id", "medium", "lora_name", [extra_keys, group_idx, kv_cache_spec_kind,
     kv_cache_spec_sliding_window, locality, ownership, session_id]}
    {"type": "BlockRemoved", "block_hashes", "medium", [group_idx, locality, ownership]}
    {"type": "AllBlocksCleared"}

Older vLLM (and the layout llm-d's Go adapter still parses) sent each event as an **array**::

    ["BlockStored", hashes, parent, token_ids, block_size, lora_id?, medium?, lora_name?, ...]
    ["BlockRemoved", hashes, medium?, ...]
    ["AllBlocksCleared"]

Both layouts are decoded, per event. Block hashes are uint64 integers
(``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``, the default) or raw digest bytes. Keys Fleet does not
represent (``lora_id``, ``extra_keys``, ``group_idx``, ...) are not checked; unknown keys are
ignored.

What is enforced is only what real vLLM always satisfies: field types, ``block_size >= 0`` and
non-empty byte hashes. ``len(token_ids) == len(block_hashes) * block_size`` is **not** enforced:
vLLM skips null/masked blocks in ``block_hashes`` but not in ``token_ids``
(``vllm/v1/core/block_pool.py`` ``cache_full_blocks``), and offloading connectors publish
placeholder events with ``token_ids=[]`` and ``block_size=0``.

**Unknown event types** (a well-formed event whose tag is a string Fleet does not know) are
skipped, and their tags are listed in :attr:`VllmEventBatch.skipped_types` for the caller to count
and log: dropping the whole batch would lose the known events beside it and desynchronise the
index further. A malformed event (no tag, a tag that is not a string, bad fields) fails the whole
batch with :class:`ProtocolError`.

Replay (ROUTER socket, always bound): a DEALER sends ``[b"", start_seq (8 bytes BE)]`` and gets
``[b"", topic, seq, payload]`` per buffered batch with ``seq >= start_seq``, then the end marker
``[b"", b"", b"\\xff" * 8, b""]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from .errors import ProtocolError
from .kvevents import AllBlocksCleared, BlockHash, BlockRemoved, BlockStored, KVEvent

REPLAY_END_SEQ: Final[bytes] = b"\xff" * 8
"""The sequence frame of the replay end marker (vLLM's ``END_SEQ``, -1 as signed 8 bytes)."""

MAX_PAYLOAD_BYTES: Final[int] = 64 * 1024 * 1024
"""Payloads larger than this are rejected before msgpack sees them."""

_CLEARED: Final[AllBlocksCleared] = AllBlocksCleared()
_MISSING: Final[object] = object()
_BYTES_LIKE = (bytes, bytearray, memoryview)


@dataclass(frozen=True)
class VllmEventBatch:
    """One batch off vLLM's KV-event stream (one engine step).

    Attributes:
        topic: the publisher's topic (``KVEventsConfig.topic``), "" when unset.
        seq: the publisher's sequence number (0 at publisher start, +1 per batch).
        ts: the engine's ``time.time()`` when it built the batch.
        events: the decoded events, in order.
        dp_rank: the data-parallel rank of the engine that published the batch.
        skipped_types: the tags of events skipped because their type is unknown, in order.
    """

    topic: str
    seq: int
    ts: float
    events: tuple[KVEvent, ...]
    dp_rank: int = 0
    skipped_types: tuple[str, ...] = ()


def decode_vllm_message(frames: Sequence[bytes]) -> VllmEventBatch:
    """Decode one message of vLLM's KV-event PUB stream.

    Args:
        frames: the message's frames, ``[topic, seq (8 bytes big-endian), msgpack payload]``.

    Returns:
        The decoded batch.

    Raises:
        ProtocolError: wrong frame count or frame type, a topic that is not UTF-8, a sequence
            frame that is not 8 bytes, undecodable msgpack, or an element of the wrong type or
            value; ``field`` names the culprit (e.g. ``events[2].block_hashes[0]``).
    """
    if len(frames) != 3:
        raise ProtocolError(
            f"expected 3 frames (topic, seq, payload), got {len(frames)}", field="frames"
        )
    topic, seq, payload = frames
    return _decode_batch(topic, seq, payload)


def decode_replay_reply(frames: Sequence[bytes]) -> VllmEventBatch | None:
    """Decode one reply a DEALER socket receives from vLLM's replay ROUTER.

    Args:
        frames: ``[b"", topic, seq, payload]`` for a batch, or the end marker
            ``[b"", b"", b"\\xff" * 8, b""]``.

    Returns:
        The batch, or ``None`` for the end marker (no more replies to this request).

    Raises:
        ProtocolError: wrong frame count, a non-empty delimiter frame, a malformed end marker,
            or any error :func:`decode_vllm_message` raises for the batch.
    """
    if len(frames) != 4:
        raise ProtocolError(
            f"expected 4 frames (b'', topic, seq, payload), got {len(frames)}", field="frames"
        )
    delimiter, topic, seq, payload = frames
    _check_frame(delimiter, "frames[0]")
    if len(delimiter) != 0:
        raise ProtocolError("expected an empty delimiter frame", field="frames[0]")
    _check_frame(seq, "seq")
    if bytes(seq) == REPLAY_END_SEQ:
        _check_frame(topic, "topic")
        _check_frame(payload, "payload")
        if len(topic) != 0 or len(payload) != 0:
            raise ProtocolError("end marker with a non-empty topic or payload", field="seq")
        return None
    return _decode_batch(topic, seq, payload)


def _check_frame(frame: object, field: str) -> None:
    if not isinstance(frame, _BYTES_LIKE):
        raise ProtocolError(f"expected a bytes frame, got {type(frame).__name__}", field=field)


def _decode_batch(topic_frame: bytes, seq_frame: bytes, payload: bytes) -> VllmEventBatch:
    _check_frame(topic_frame, "topic")
    _check_frame(seq_frame, "seq")
    _check_frame(payload, "payload")
    try:
        topic = bytes(topic_frame).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"topic is not UTF-8: {exc}", field="topic") from exc
    if len(seq_frame) != 8:
        raise ProtocolError(f"expected 8 bytes, got {len(seq_frame)}", field="seq")
    seq = int.from_bytes(seq_frame, "big")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"{len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}", field="payload")
    try:
        data = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"undecodable msgpack: {exc}", field="payload") from exc
    if type(data) is not list or len(data) < 2:
        what = f"array of {len(data)}" if type(data) is list else type(data).__name__
        raise ProtocolError(
            f"expected an array [ts, events, data_parallel_rank], got {what}", field="payload"
        )
    ts = data[0]
    if type(ts) not in (float, int) or not math.isfinite(ts):
        raise ProtocolError(f"expected a finite float, got {ts!r:.40}", field="ts")
    raw_events = data[1]
    if type(raw_events) is not list:
        raise ProtocolError(f"expected an array, got {type(raw_events).__name__}", field="events")
    rank = data[2] if len(data) > 2 else None
    if rank is None:
        rank = 0
    elif type(rank) is not int or rank < 0:
        raise ProtocolError(f"expected a non-negative int, got {rank!r:.40}", field="dp_rank")
    events: list[KVEvent] = []
    skipped: list[str] = []
    for i, raw in enumerate(raw_events):
        event = _decode_event(raw, f"events[{i}]")
        if isinstance(event, str):
            skipped.append(event)
        else:
            events.append(event)
    return VllmEventBatch(topic, seq, float(ts), tuple(events), rank, tuple(skipped))


def _decode_event(raw: Any, path: str) -> KVEvent | str:
    """Return the event, or its tag when the type is unknown."""
    if type(raw) is dict:
        return _decode_map_event(raw, path)
    if type(raw) is list:
        return _decode_array_event(raw, path)
    raise ProtocolError(f"expected a map or an array, got {type(raw).__name__}", field=path)


def _decode_map_event(raw: dict[Any, Any], path: str) -> KVEvent | str:
    tag = raw.get("type", _MISSING)
    if tag is _MISSING:
        raise ProtocolError("missing event type", field=f"{path}.type")
    if type(tag) is not str:
        raise ProtocolError(f"expected str, got {type(tag).__name__}", field=f"{path}.type")
    if tag == "BlockStored":
        return _block_stored(
            path,
            _required(raw, "block_hashes", path),
            _required(raw, "parent_block_hash", path),
            _required(raw, "token_ids", path),
            _required(raw, "block_size", path),
            raw.get("medium"),
            raw.get("lora_name"),
        )
    if tag == "BlockRemoved":
        return _block_removed(path, _required(raw, "block_hashes", path), raw.get("medium"))
    if tag == "AllBlocksCleared":
        return _CLEARED
    return tag


def _decode_array_event(raw: list[Any], path: str) -> KVEvent | str:
    if not raw:
        raise ProtocolError("empty legacy event array", field=path)
    tag = raw[0]
    if type(tag) is not str:
        raise ProtocolError(f"expected str, got {type(tag).__name__}", field=f"{path}.type")
    n = len(raw)
    if tag == "BlockStored":
        if n < 5:
            raise ProtocolError(
                f"legacy BlockStored has {n} elements, needs at least 5", field=path
            )
        medium = raw[6] if n > 6 else None
        lora_name = raw[7] if n > 7 else None
        return _block_stored(path, raw[1], raw[2], raw[3], raw[4], medium, lora_name)
    if tag == "BlockRemoved":
        if n < 2:
            raise ProtocolError(
                f"legacy BlockRemoved has {n} elements, needs at least 2", field=path
            )
        return _block_removed(path, raw[1], raw[2] if n > 2 else None)
    if tag == "AllBlocksCleared":
        return _CLEARED
    return tag


def _required(raw: dict[Any, Any], key: str, path: str) -> Any:
    value = raw.get(key, _MISSING)
    if value is _MISSING:
        raise ProtocolError("missing required field", field=f"{path}.{key}")
    return value


def _block_stored(
    path: str,
    hashes: Any,
    parent: Any,
    token_ids: Any,
    block_size: Any,
    medium: Any,
    lora_name: Any,
) -> BlockStored:
    if type(block_size) is not int or block_size < 0:
        raise ProtocolError(
            f"expected a non-negative int, got {block_size!r:.40}", field=f"{path}.block_size"
        )
    return BlockStored(
        block_hashes=_hashes(hashes, f"{path}.block_hashes"),
        parent_block_hash=None if parent is None else _hash(parent, f"{path}.parent_block_hash"),
        token_ids=_token_ids(token_ids, f"{path}.token_ids"),
        block_size=block_size,
        lora_name=_optional_str(lora_name, f"{path}.lora_name"),
        medium=_optional_str(medium, f"{path}.medium"),
    )


def _block_removed(path: str, hashes: Any, medium: Any) -> BlockRemoved:
    return BlockRemoved(
        block_hashes=_hashes(hashes, f"{path}.block_hashes"),
        medium=_optional_str(medium, f"{path}.medium"),
    )


def _hash(value: Any, path: str) -> BlockHash:
    kind = type(value)
    if kind is int:
        return value  # type: ignore[no-any-return]
    if kind is bytes:
        if not value:
            raise ProtocolError("empty hash bytes", field=path)
        return value  # type: ignore[no-any-return]
    raise ProtocolError(f"expected an int or bytes hash, got {kind.__name__}", field=path)


def _hashes(value: Any, path: str) -> tuple[BlockHash, ...]:
    if type(value) is not list:
        raise ProtocolError(f"expected an array, got {type(value).__name__}", field=path)
    return tuple(_hash(h, f"{path}[{i}]") for i, h in enumerate(value))


def _token_ids(value: Any, path: str) -> tuple[int, ...]:
    if type(value) is not list:
        raise ProtocolError(f"expected an array, got {type(value).__name__}", field=path)
    for i, token in enumerate(value):  # one pass; bool is not an int here
        if type(token) is not int:
            raise ProtocolError(f"expected int, got {type(token).__name__}", field=f"{path}[{i}]")
    return tuple(value)


def _optional_str(value: Any, path: str) -> str | None:
    if value is None or type(value) is str:
        return value
    raise ProtocolError(f"expected str or nil, got {type(value).__name__}", field=path)


__all__ = [
    "MAX_PAYLOAD_BYTES",
    "REPLAY_END_SEQ",
    "VllmEventBatch",
    "decode_replay_reply",
    "decode_vllm_message",
]
