"""vLLM's KV-event wire format, checked against vLLM 0.32's own classes and publisher."""

from __future__ import annotations

import math
import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack
import msgspec
import pytest
import vllm.distributed.kv_events as vke
import zmq

from fleet.protocol.errors import ProtocolError
from fleet.protocol.kvevents import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from fleet.protocol.vllm_events import (
    MAX_PAYLOAD_BYTES,
    REPLAY_END_SEQ,
    VllmEventBatch,
    decode_replay_reply,
    decode_vllm_message,
)
from fleet.protocol.vllm_events_encode import encode_replay_request, encode_vllm_message

ENCODER = msgspec.msgpack.Encoder()
SHA = bytes(range(32))
INT_HASHES = (0, 1, 127, 128, 255, 256, 65535, 65536, 2**32, 2**63 - 1, 2**63, 2**64 - 1)


def seq8(n: int) -> bytes:
    return n.to_bytes(8, "big")


def vllm_frames(batch: vke.KVEventBatch, topic: bytes = b"kv", seq: int = 7) -> list[bytes]:
    """What ZmqEventPublisher._publisher_thread sends for ``batch``."""
    return [topic, seq8(seq), ENCODER.encode(batch)]


def to_vllm(
    event: KVEvent, group_idx: int | None = None, spec_kind: str | None = None
) -> vke.KVCacheEvent:
    """The vLLM struct a real engine would build for a Fleet event."""
    if isinstance(event, BlockStored):
        extra: dict[str, Any] = {}
        if group_idx is not None:
            if event.block_hashes:
                per_block = (event.lora_name,) if event.lora_name is not None else None
                extra["extra_keys"] = [per_block] * len(event.block_hashes)
            extra["group_idx"] = group_idx
            extra["kv_cache_spec_kind"] = spec_kind
        return vke.BlockStored(
            block_hashes=list(event.block_hashes),
            parent_block_hash=event.parent_block_hash,
            token_ids=list(event.token_ids),
            block_size=event.block_size,
            lora_id=None,
            medium=event.medium,
            lora_name=event.lora_name,
            **extra,
        )
    if isinstance(event, BlockRemoved):
        return vke.BlockRemoved(
            block_hashes=list(event.block_hashes), medium=event.medium, group_idx=group_idx
        )
    return vke.AllBlocksCleared()


def stored(n: int = 2, hashes: Sequence[int | bytes] | None = None, **kw: Any) -> BlockStored:
    block_hashes = tuple(hashes) if hashes is not None else tuple(range(100, 100 + n))
    fields: dict[str, Any] = {
        "parent_block_hash": None,
        "token_ids": tuple(range(len(block_hashes) * 32)),
        "block_size": 32,
        "medium": "GPU",
    }
    fields.update(kw)
    return BlockStored(block_hashes=block_hashes, **fields)


# --- decoding what vLLM encodes ---------------------------------------------------------------


def test_decodes_vllm_batch_with_every_field() -> None:
    batch = vke.KVEventBatch(
        ts=1_700_000_000.25,
        events=[
            vke.BlockStored(
                block_hashes=[18373130707868922423, 5],
                parent_block_hash=None,
                token_ids=list(range(64)),
                block_size=32,
                lora_id=3,
                medium="GPU",
                lora_name="sql-adapter",
                extra_keys=[("sql-adapter", ("mm-hash", 0)), None],
                group_idx=0,
                kv_cache_spec_kind="full_attention",
                kv_cache_spec_sliding_window=128,
                locality="LOCAL",
                ownership="tier-2",
                session_id="s-1",
            ),
            vke.BlockRemoved(
                block_hashes=[5], medium="GPU", group_idx=1, locality="REMOTE", ownership="x"
            ),
            vke.AllBlocksCleared(),
        ],
        data_parallel_rank=2,
    )
    decoded = decode_vllm_message(vllm_frames(batch, topic=b"kv@pod@model", seq=2**40))
    assert decoded == VllmEventBatch(
        topic="kv@pod@model",
        seq=2**40,
        ts=1_700_000_000.25,
        events=(
            BlockStored(
                block_hashes=(18373130707868922423, 5),
                parent_block_hash=None,
                token_ids=tuple(range(64)),
                block_size=32,
                lora_name="sql-adapter",
                medium="GPU",
            ),
            BlockRemoved(block_hashes=(5,), medium="GPU"),
            AllBlocksCleared(),
        ),
        dp_rank=2,
    )


def test_decodes_the_event_seen_on_a_real_cpu_engine() -> None:
    # shared/VLLM-CPU.md "KV events on the wire": what the engine published for one block.
    batch = vke.KVEventBatch(
        ts=1.0,
        events=[
            vke.BlockStored(
                block_hashes=[18373130707868922423],
                parent_block_hash=None,
                token_ids=list(range(32)),
                block_size=32,
                lora_id=None,
                medium="GPU",
                lora_name=None,
                extra_keys=[None],
                group_idx=0,
                kv_cache_spec_kind="full_attention",
            )
        ],
        data_parallel_rank=0,
    )
    payload = ENCODER.encode(batch)
    assert msgpack.unpackb(payload)[1][0] == {
        "type": "BlockStored",
        "block_hashes": [18373130707868922423],
        "parent_block_hash": None,
        "token_ids": list(range(32)),
        "block_size": 32,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "extra_keys": [None],
        "group_idx": 0,
        "kv_cache_spec_kind": "full_attention",
    }
    decoded = decode_vllm_message([b"kv", seq8(0), payload])
    assert decoded.events == (
        BlockStored((18373130707868922423,), None, tuple(range(32)), 32, None, "GPU"),
    )


def test_decodes_bytes_hashes() -> None:
    # VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0: raw digests (sha256: 32 bytes, xxh3_128: 16).
    parent = b"\xaa" * 16
    batch = vke.KVEventBatch(
        ts=2.0,
        events=[
            vke.BlockStored(
                block_hashes=[SHA, b"\x01" * 16],
                parent_block_hash=parent,
                token_ids=list(range(64)),
                block_size=32,
                lora_id=None,
                medium=None,
                lora_name=None,
            ),
            vke.BlockRemoved(block_hashes=[SHA], medium=None),
        ],
    )
    decoded = decode_vllm_message(vllm_frames(batch))
    first = decoded.events[0]
    assert isinstance(first, BlockStored)
    assert first.block_hashes == (SHA, b"\x01" * 16)
    assert first.parent_block_hash == parent
    assert decoded.events[1] == BlockRemoved(block_hashes=(SHA,), medium=None)


def test_decodes_int_hashes_of_every_width() -> None:
    batch = vke.KVEventBatch(
        ts=2.0,
        events=[vke.BlockRemoved(block_hashes=list(INT_HASHES), medium="GPU")],
        data_parallel_rank=0,
    )
    assert decode_vllm_message(vllm_frames(batch)).events == (
        BlockRemoved(block_hashes=INT_HASHES, medium="GPU"),
    )


def test_missing_or_nil_rank_reads_as_zero() -> None:
    batch = vke.KVEventBatch(ts=3.0, events=[vke.AllBlocksCleared()])  # rank left None
    assert decode_vllm_message(vllm_frames(batch)).dp_rank == 0
    two = msgpack.packb([3.0, [{"type": "AllBlocksCleared"}]])
    decoded = decode_vllm_message([b"", seq8(1), two])
    assert (decoded.topic, decoded.seq, decoded.dp_rank) == ("", 1, 0)
    assert decoded.events == (AllBlocksCleared(),)


def test_trailing_batch_elements_and_unknown_keys_are_ignored() -> None:
    event = {"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU", "new_key": [1, 2]}
    payload = msgpack.packb([3.0, [event], 1, "future"])
    decoded = decode_vllm_message([b"kv", seq8(1), payload])
    assert decoded.events == (BlockRemoved(block_hashes=(1,), medium="GPU"),)
    assert decoded.dp_rank == 1


def test_optional_medium_and_lora_name_may_be_absent() -> None:
    stored_map = {
        "type": "BlockStored",
        "block_hashes": [1],
        "parent_block_hash": 9,
        "token_ids": [1, 2],
        "block_size": 2,
    }
    removed_map = {"type": "BlockRemoved", "block_hashes": [1]}
    decoded = decode_vllm_message([b"", seq8(0), msgpack.packb([1.0, [stored_map, removed_map]])])
    assert decoded.events == (
        BlockStored(block_hashes=(1,), parent_block_hash=9, token_ids=(1, 2), block_size=2),
        BlockRemoved(block_hashes=(1,)),
    )


def test_token_count_is_not_tied_to_hash_count() -> None:
    # block_pool.cache_full_blocks skips null/masked blocks in block_hashes but not in
    # token_ids; offloading connectors publish placeholders with token_ids=[] and block_size=0.
    batch = vke.KVEventBatch(
        ts=1.0,
        events=[
            vke.BlockStored(
                block_hashes=[1],
                parent_block_hash=None,
                token_ids=list(range(96)),
                block_size=32,
                lora_id=None,
                medium="GPU",
                lora_name=None,
            ),
            vke.BlockStored(
                block_hashes=[2],
                parent_block_hash=None,
                token_ids=[],
                block_size=0,
                lora_id=None,
                medium="CPU",
                lora_name=None,
            ),
            vke.BlockStored(
                block_hashes=[],
                parent_block_hash=1,
                token_ids=list(range(32)),
                block_size=32,
                lora_id=None,
                medium="GPU",
                lora_name=None,
            ),
        ],
    )
    events = decode_vllm_message(vllm_frames(batch)).events
    assert [len(e.token_ids) for e in events if isinstance(e, BlockStored)] == [96, 0, 32]


def test_empty_batch() -> None:
    batch = vke.KVEventBatch(ts=1.0, events=[], data_parallel_rank=0)
    assert decode_vllm_message(vllm_frames(batch)).events == ()


# --- the legacy array layout ------------------------------------------------------------------


class OldBlockStored(
    msgspec.Struct, array_like=True, omit_defaults=True, tag="BlockStored", kw_only=False
):
    """BlockStored as vLLM published it before events became maps (tag first, then fields)."""

    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None = None


class OldBlockRemoved(msgspec.Struct, array_like=True, omit_defaults=True, tag="BlockRemoved"):
    block_hashes: list[int | bytes]
    medium: str | None = None


class OldAllBlocksCleared(
    msgspec.Struct, array_like=True, omit_defaults=True, tag="AllBlocksCleared"
):
    pass


def test_decodes_legacy_arrays_from_msgspec_structs() -> None:
    old_events = [
        OldBlockStored([1, 2], None, list(range(4)), 2, None),
        OldBlockStored([SHA], 2, [5, 6], 2, 7, "GPU"),
        OldBlockRemoved([1]),
        OldAllBlocksCleared(),
    ]
    payload = ENCODER.encode([1.5, old_events])
    first = msgpack.unpackb(payload)[1][0]
    assert first[:6] == ["BlockStored", [1, 2], None, [0, 1, 2, 3], 2, None]
    decoded = decode_vllm_message([b"kv", seq8(3), payload])
    assert decoded.events == (
        BlockStored(
            block_hashes=(1, 2), parent_block_hash=None, token_ids=(0, 1, 2, 3), block_size=2
        ),
        BlockStored((SHA,), 2, (5, 6), 2, None, "GPU"),
        BlockRemoved(block_hashes=(1,)),
        AllBlocksCleared(),
    )


def test_decodes_full_legacy_arrays() -> None:
    # The layout in REFERENCE.md section 1 (what llm-d's Go adapter parses), with every slot.
    events = [
        ["BlockStored", [1], 0, [1, 2], 2, 4, "CPU", "lora-a", [["x"]], 0, "full_attention", None],
        ["BlockRemoved", [1, SHA], "CPU", 0],
        ["AllBlocksCleared"],
        ["BlockStored", [2], 1, [3, 4], 2],  # trailing defaults omitted: the shortest form
        ["BlockRemoved", [2]],
    ]
    decoded = decode_vllm_message([b"kv", seq8(3), msgpack.packb([1.5, events, 0])])
    assert decoded.events == (
        BlockStored((1,), 0, (1, 2), 2, lora_name="lora-a", medium="CPU"),
        BlockRemoved((1, SHA), medium="CPU"),
        AllBlocksCleared(),
        BlockStored((2,), 1, (3, 4), 2),
        BlockRemoved((2,)),
    )


# --- unknown event types ----------------------------------------------------------------------


def test_unknown_event_types_are_skipped_and_listed() -> None:
    events = [
        {"type": "BlockUpdated", "block_hashes": [1]},
        {"type": "AllBlocksCleared"},
        ["SomethingNew", 1, 2],
        ["BlockRemoved", [4]],
    ]
    decoded = decode_vllm_message([b"kv", seq8(3), msgpack.packb([1.5, events, 0])])
    assert decoded.events == (AllBlocksCleared(), BlockRemoved((4,)))
    assert decoded.skipped_types == ("BlockUpdated", "SomethingNew")


# --- replay -----------------------------------------------------------------------------------


def test_replay_request_frames() -> None:
    assert encode_replay_request(0) == [b"", b"\x00" * 8]
    assert encode_replay_request(258) == [b"", b"\x00\x00\x00\x00\x00\x00\x01\x02"]
    assert encode_replay_request(2**64 - 1) == [b"", b"\xff" * 8]


@pytest.mark.parametrize("bad", [-1, 2**64, 1.0, True])
def test_replay_request_rejects_bad_seq(bad: Any) -> None:
    with pytest.raises(ValueError):
        encode_replay_request(bad)


def test_replay_end_marker() -> None:
    marker = [b"", b"", vke.ZmqEventPublisher.END_SEQ, b""]
    assert REPLAY_END_SEQ == vke.ZmqEventPublisher.END_SEQ
    assert decode_replay_reply(marker) is None


def test_replay_reply() -> None:
    batch = vke.KVEventBatch(ts=1.0, events=[vke.AllBlocksCleared()], data_parallel_rank=0)
    decoded = decode_replay_reply([b"", *vllm_frames(batch, seq=41)])
    assert decoded is not None
    assert (decoded.topic, decoded.seq, decoded.events) == ("kv", 41, (AllBlocksCleared(),))


@pytest.mark.parametrize(
    ("frames", "field"),
    [
        ([b"", b"", REPLAY_END_SEQ], "frames"),
        ([b"", b"", REPLAY_END_SEQ, b"", b""], "frames"),
        ([b"x", b"", REPLAY_END_SEQ, b""], "frames[0]"),
        ([b"", b"kv", REPLAY_END_SEQ, b""], "seq"),
        ([b"", b"", REPLAY_END_SEQ, b"\x90"], "seq"),
        ([b"", b"kv", b"\x00" * 7, msgpack.packb([1.0, []])], "seq"),
        ([b"", b"kv", b"\x00" * 8, b"\xc1"], "payload"),
        (["", b"", REPLAY_END_SEQ, b""], "frames[0]"),
    ],
)
def test_replay_rejects_malformed(frames: list[Any], field: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_replay_reply(frames)
    assert info.value.field == field


@pytest.fixture
def publisher() -> Iterator[tuple[vke.ZmqEventPublisher, str]]:
    """vLLM's real publisher on inproc endpoints (PUB + replay ROUTER, both bound)."""
    name = uuid.uuid4().hex
    replay = f"inproc://fleet-replay-{name}"
    pub = vke.ZmqEventPublisher(
        data_parallel_rank=0,
        endpoint=f"inproc://fleet-pub-{name}",
        replay_endpoint=replay,
        buffer_steps=10,
        topic="kv",
    )
    try:
        yield pub, replay
    finally:
        pub.shutdown()


def _published(pub: vke.ZmqEventPublisher) -> None:
    """Wait (bounded) until the publisher thread has sent and buffered every queued batch."""
    waiter = threading.Thread(target=pub._event_queue.join, daemon=True)
    waiter.start()
    waiter.join(timeout=10)
    assert not waiter.is_alive(), "vLLM's publisher thread did not publish"


def test_replay_from_real_vllm_publisher(publisher: tuple[vke.ZmqEventPublisher, str]) -> None:
    pub, endpoint = publisher
    ours: list[list[bytes]] = []
    fleet_events: list[tuple[KVEvent, ...]] = [
        (stored(2, medium="GPU"), BlockRemoved((100,), medium="GPU")),
        (AllBlocksCleared(),),
        (stored(hashes=[SHA], parent_block_hash=SHA, lora_name="a"),),
    ]
    for seq, events in enumerate(fleet_events):
        ts = 1_700_000_000.0 + seq / 8
        pub.publish(
            vke.KVEventBatch(ts=ts, events=[to_vllm(e, 0, "full_attention") for e in events])
        )
        ours.append(
            encode_vllm_message(
                "kv", seq, ts, events, group_idx=0, kv_cache_spec_kind="full_attention"
            )
        )
    _published(pub)

    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVTIMEO, 10_000)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(endpoint)
        dealer.send_multipart(encode_replay_request(1))
        replies = [dealer.recv_multipart() for _ in range(3)]
    finally:
        dealer.close()

    assert replies[2] == [b"", b"", REPLAY_END_SEQ, b""]
    assert decode_replay_reply(replies[2]) is None
    for reply, seq in zip(replies[:2], (1, 2), strict=True):
        assert reply[1:] == ours[seq]  # byte-identical to what vLLM sent
        decoded = decode_replay_reply(reply)
        assert decoded is not None
        assert (decoded.topic, decoded.seq, decoded.dp_rank) == ("kv", seq, 0)
        assert decoded.events == fleet_events[seq]


# --- encode_vllm_message is byte-identical to vLLM's encoder ----------------------------------

BATCHES: list[tuple[str, tuple[KVEvent, ...]]] = [
    ("empty", ()),
    ("cleared", (AllBlocksCleared(),)),
    ("one-block", (stored(1),)),
    ("int-hash-widths", (BlockRemoved(INT_HASHES, medium="GPU"), stored(hashes=INT_HASHES))),
    ("bytes-hashes", (stored(hashes=[SHA, SHA[:16]], parent_block_hash=SHA), BlockRemoved((SHA,)))),
    ("int-parent", (stored(3, parent_block_hash=2**64 - 1),)),
    ("no-medium", (stored(2, medium=None), BlockRemoved((1, 2), medium=None))),
    ("lora", (stored(2, lora_name="l" * 40),)),
    ("long-strings", (stored(1, lora_name="é" * 300, medium="M" * 70000),)),
    ("no-blocks", (stored(hashes=[], token_ids=tuple(range(5))),)),
    ("placeholder", (stored(hashes=[5], token_ids=(), block_size=0),)),
    ("token-widths", (stored(hashes=[1], token_ids=(0, 127, 128, 255, 256, 65535, 65536, 2**31)),)),
    ("many-tokens", (stored(hashes=list(range(2100)), block_size=32),)),  # array32 of tokens
    ("many-events", tuple(BlockRemoved((i,), medium="GPU") for i in range(70000))),
    (
        "mixed",
        (stored(2), BlockRemoved((100,)), AllBlocksCleared(), stored(1, parent_block_hash=101)),
    ),
]


@pytest.mark.parametrize(("name", "events"), BATCHES, ids=[b[0] for b in BATCHES])
@pytest.mark.parametrize("ts", [0.0, 1_700_000_000.123456, 1e-300])
def test_encode_is_byte_identical_to_vllm(
    name: str, events: tuple[KVEvent, ...], ts: float
) -> None:
    for dp_rank in (0, 3):
        batch = vke.KVEventBatch(
            ts=ts, events=[to_vllm(e) for e in events], data_parallel_rank=dp_rank
        )
        assert encode_vllm_message("kv", 9, ts, events, dp_rank) == vllm_frames(batch, b"kv", 9)


@pytest.mark.parametrize(("name", "events"), BATCHES, ids=[b[0] for b in BATCHES])
def test_encode_with_scheduler_fields_is_byte_identical(
    name: str, events: tuple[KVEvent, ...]
) -> None:
    for group_idx, kind in ((0, "full_attention"), (1, None), (2, "sliding_window")):
        batch = vke.KVEventBatch(
            ts=5.5, events=[to_vllm(e, group_idx, kind) for e in events], data_parallel_rank=0
        )
        frames = encode_vllm_message(
            "", 2**64 - 1, 5.5, events, group_idx=group_idx, kv_cache_spec_kind=kind
        )
        assert frames == vllm_frames(batch, b"", 2**64 - 1)


@pytest.mark.parametrize(("name", "events"), BATCHES, ids=[b[0] for b in BATCHES])
def test_encode_decode_round_trip(name: str, events: tuple[KVEvent, ...]) -> None:
    frames = encode_vllm_message("kv@pod@model", 12, 3.25, events, dp_rank=1, group_idx=0)
    assert decode_vllm_message(frames) == VllmEventBatch("kv@pod@model", 12, 3.25, events, 1)


def test_encode_topic_is_utf8() -> None:
    assert encode_vllm_message("kv-é", 0, 1.0, ())[0] == "kv-é".encode()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"seq": -1}, ValueError),
        ({"seq": 2**64}, ValueError),
        ({"dp_rank": -1}, ValueError),
        ({"events": [object()]}, TypeError),
    ],
)
def test_encode_rejects_bad_arguments(kwargs: dict[str, Any], error: type[Exception]) -> None:
    args: dict[str, Any] = {"topic": "kv", "seq": 0, "ts": 1.0, "events": ()}
    args.update(kwargs)
    with pytest.raises(error):
        encode_vllm_message(**args)


# --- malformed input --------------------------------------------------------------------------

GOOD_STORED: dict[str, Any] = {
    "type": "BlockStored",
    "block_hashes": [1, 2],
    "parent_block_hash": None,
    "token_ids": [1, 2, 3, 4],
    "block_size": 2,
    "lora_id": None,
    "medium": "GPU",
    "lora_name": None,
}
GOOD_REMOVED: dict[str, Any] = {"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU"}


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        if value is _DROP:
            del out[key]
        else:
            out[key] = value
    return out


_DROP = object()


def batch_payload(*events: Any, ts: Any = 1.0, rank: Any = 0) -> bytes:
    return msgpack.packb([ts, list(events), rank], use_bin_type=True)


def msg(payload: bytes) -> list[bytes]:
    return [b"kv", seq8(1), payload]


GOOD_PAYLOAD = batch_payload(GOOD_STORED, GOOD_REMOVED)

MALFORMED: list[tuple[str, Any, str]] = [
    ("no-frames", [], "frames"),
    ("two-frames", [b"kv", seq8(1)], "frames"),
    ("four-frames", [b"kv", seq8(1), GOOD_PAYLOAD, b""], "frames"),
    ("str-topic", ["kv", seq8(1), GOOD_PAYLOAD], "topic"),
    ("int-seq-frame", [b"kv", 1, GOOD_PAYLOAD], "seq"),
    ("none-payload", [b"kv", seq8(1), None], "payload"),
    ("bad-utf8-topic", [b"\xff\xfe", seq8(1), GOOD_PAYLOAD], "topic"),
    ("short-seq", [b"kv", b"\x00" * 7, GOOD_PAYLOAD], "seq"),
    ("long-seq", [b"kv", b"\x00" * 9, GOOD_PAYLOAD], "seq"),
    ("empty-seq", [b"kv", b"", GOOD_PAYLOAD], "seq"),
    ("empty-payload", msg(b""), "payload"),
    ("never-used-byte", msg(b"\xc1"), "payload"),
    ("truncated", msg(GOOD_PAYLOAD[:-3]), "payload"),
    ("truncated-header", msg(GOOD_PAYLOAD[:1]), "payload"),
    ("trailing-bytes", msg(GOOD_PAYLOAD + b"\x00"), "payload"),
    (
        "bad-utf8-string",
        msg(b"\x93\xcb" + b"\x00" * 8 + b"\x91\x81\xa4type\xa2\xff\xfe\x00"),
        "payload",
    ),
    ("payload-map", msg(msgpack.packb({"ts": 1.0, "events": []})), "payload"),
    ("payload-int", msg(msgpack.packb(5)), "payload"),
    ("payload-one-element", msg(msgpack.packb([1.0])), "payload"),
    ("ts-str", msg(batch_payload(ts="now")), "ts"),
    ("ts-nil", msg(batch_payload(ts=None)), "ts"),
    ("ts-bool", msg(batch_payload(ts=True)), "ts"),
    ("ts-nan", msg(batch_payload(ts=math.nan)), "ts"),
    ("ts-inf", msg(batch_payload(ts=math.inf)), "ts"),
    ("events-map", msg(msgpack.packb([1.0, {}, 0])), "events"),
    ("events-nil", msg(msgpack.packb([1.0, None, 0])), "events"),
    ("rank-negative", msg(batch_payload(rank=-1)), "dp_rank"),
    ("rank-str", msg(batch_payload(rank="0")), "dp_rank"),
    ("rank-bool", msg(batch_payload(rank=False)), "dp_rank"),
    ("rank-float", msg(batch_payload(rank=0.0)), "dp_rank"),
    ("event-int", msg(batch_payload(5)), "events[0]"),
    ("event-str", msg(batch_payload("BlockStored")), "events[0]"),
    ("event-nil", msg(batch_payload(GOOD_REMOVED, None)), "events[1]"),
    ("no-type", msg(batch_payload(with_(GOOD_STORED, type=_DROP))), "events[0].type"),
    ("int-type", msg(batch_payload(with_(GOOD_STORED, type=1))), "events[0].type"),
    ("nil-type", msg(batch_payload(with_(GOOD_STORED, type=None))), "events[0].type"),
    ("bytes-type", msg(batch_payload(with_(GOOD_STORED, type=b"BlockStored"))), "events[0].type"),
]
for key in ("block_hashes", "parent_block_hash", "token_ids", "block_size"):
    MALFORMED.append(
        (
            f"missing-{key}",
            msg(batch_payload(with_(GOOD_STORED, **{key: _DROP}))),
            f"events[0].{key}",
        )
    )
MALFORMED += [
    (
        "hashes-nil",
        msg(batch_payload(with_(GOOD_STORED, block_hashes=None))),
        "events[0].block_hashes",
    ),
    (
        "hashes-int",
        msg(batch_payload(with_(GOOD_STORED, block_hashes=1))),
        "events[0].block_hashes",
    ),
    (
        "hash-str",
        msg(batch_payload(with_(GOOD_STORED, block_hashes=[1, "2"]))),
        "events[0].block_hashes[1]",
    ),
    (
        "hash-float",
        msg(batch_payload(with_(GOOD_STORED, block_hashes=[1.0]))),
        "events[0].block_hashes[0]",
    ),
    (
        "hash-bool",
        msg(batch_payload(with_(GOOD_STORED, block_hashes=[True]))),
        "events[0].block_hashes[0]",
    ),
    (
        "hash-nil",
        msg(batch_payload(with_(GOOD_STORED, block_hashes=[None]))),
        "events[0].block_hashes[0]",
    ),
    (
        "hash-empty-bytes",
        msg(batch_payload(with_(GOOD_STORED, block_hashes=[b""]))),
        "events[0].block_hashes[0]",
    ),
    (
        "hash-list",
        msg(batch_payload(with_(GOOD_STORED, block_hashes=[[1]]))),
        "events[0].block_hashes[0]",
    ),
    (
        "hash-ext",
        msg(batch_payload(with_(GOOD_STORED, block_hashes=[msgpack.ExtType(5, b"x")]))),
        "events[0].block_hashes[0]",
    ),
    (
        "parent-str",
        msg(batch_payload(with_(GOOD_STORED, parent_block_hash="p"))),
        "events[0].parent_block_hash",
    ),
    (
        "parent-bool",
        msg(batch_payload(with_(GOOD_STORED, parent_block_hash=False))),
        "events[0].parent_block_hash",
    ),
    ("tokens-nil", msg(batch_payload(with_(GOOD_STORED, token_ids=None))), "events[0].token_ids"),
    (
        "tokens-bytes",
        msg(batch_payload(with_(GOOD_STORED, token_ids=b"\x01\x02"))),
        "events[0].token_ids",
    ),
    (
        "token-str",
        msg(batch_payload(with_(GOOD_STORED, token_ids=[1, 2, "3", 4]))),
        "events[0].token_ids[2]",
    ),
    (
        "token-bool",
        msg(batch_payload(with_(GOOD_STORED, token_ids=[1, True]))),
        "events[0].token_ids[1]",
    ),
    (
        "token-float",
        msg(batch_payload(with_(GOOD_STORED, token_ids=[1.5]))),
        "events[0].token_ids[0]",
    ),
    (
        "block-size-negative",
        msg(batch_payload(with_(GOOD_STORED, block_size=-1))),
        "events[0].block_size",
    ),
    (
        "block-size-str",
        msg(batch_payload(with_(GOOD_STORED, block_size="32"))),
        "events[0].block_size",
    ),
    (
        "block-size-float",
        msg(batch_payload(with_(GOOD_STORED, block_size=32.0))),
        "events[0].block_size",
    ),
    (
        "block-size-nil",
        msg(batch_payload(with_(GOOD_STORED, block_size=None))),
        "events[0].block_size",
    ),
    (
        "block-size-bool",
        msg(batch_payload(with_(GOOD_STORED, block_size=True))),
        "events[0].block_size",
    ),
    ("medium-int", msg(batch_payload(with_(GOOD_STORED, medium=1))), "events[0].medium"),
    (
        "lora-name-bytes",
        msg(batch_payload(with_(GOOD_STORED, lora_name=b"a"))),
        "events[0].lora_name",
    ),
    (
        "removed-no-hashes",
        msg(batch_payload(with_(GOOD_REMOVED, block_hashes=_DROP))),
        "events[0].block_hashes",
    ),
    (
        "removed-hash-str",
        msg(batch_payload(GOOD_STORED, with_(GOOD_REMOVED, block_hashes=["x"]))),
        "events[1].block_hashes[0]",
    ),
    (
        "removed-medium-list",
        msg(batch_payload(with_(GOOD_REMOVED, medium=["GPU"]))),
        "events[0].medium",
    ),
    ("legacy-empty", msg(batch_payload([])), "events[0]"),
    ("legacy-int-tag", msg(batch_payload([1, [1]])), "events[0].type"),
    ("legacy-nil-tag", msg(batch_payload([None])), "events[0].type"),
    ("legacy-stored-short", msg(batch_payload(["BlockStored", [1], None, [1, 2]])), "events[0]"),
    ("legacy-removed-short", msg(batch_payload(["BlockRemoved"])), "events[0]"),
    ("legacy-hash-str", msg(batch_payload(["BlockRemoved", ["h"]])), "events[0].block_hashes[0]"),
    (
        "legacy-block-size",
        msg(batch_payload(["BlockStored", [1], None, [1], -2])),
        "events[0].block_size",
    ),
    (
        "legacy-tokens",
        msg(batch_payload(["BlockStored", [1], None, "ab", 2])),
        "events[0].token_ids",
    ),
    (
        "legacy-medium",
        msg(batch_payload(["BlockStored", [1], None, [1], 1, None, 5])),
        "events[0].medium",
    ),
    (
        "legacy-lora-name",
        msg(batch_payload(["BlockStored", [1], None, [1], 1, None, "GPU", 7])),
        "events[0].lora_name",
    ),
]


@pytest.mark.parametrize(("name", "frames", "field"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_rejects_malformed(name: str, frames: Any, field: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_vllm_message(frames)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


def test_rejects_oversized_payload() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_vllm_message(msg(b"\x90" * (MAX_PAYLOAD_BYTES + 1)))
    assert info.value.field == "payload"


def test_good_payload_of_the_malformed_cases_decodes() -> None:
    decoded = decode_vllm_message(msg(GOOD_PAYLOAD))
    assert decoded.events == (
        BlockStored((1, 2), None, (1, 2, 3, 4), 2, None, "GPU"),
        BlockRemoved((1,), "GPU"),
    )


def test_accepts_memoryview_and_bytearray_frames() -> None:
    decoded = decode_vllm_message([bytearray(b"kv"), memoryview(seq8(1)), memoryview(GOOD_PAYLOAD)])
    assert (decoded.topic, decoded.seq, len(decoded.events)) == ("kv", 1, 2)
