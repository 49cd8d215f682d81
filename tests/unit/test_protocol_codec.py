"""The agent <-> coordinator codec: every message round-trips, bad input raises ProtocolError."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest

from fleet.protocol import codec
from fleet.protocol.errors import ProtocolError
from fleet.protocol.kvevents import AllBlocksCleared, BlockRemoved, BlockStored
from fleet.protocol.messages import (
    MESSAGE_TYPES,
    AssignEngine,
    CachedModelInfo,
    EngineSpec,
    EngineStatus,
    ErrorReport,
    FetchInfo,
    GpuInfo,
    Heartbeat,
    KVEventBatch,
    KVSnapshot,
    Message,
    PrestageModel,
    Register,
    UnassignEngine,
    Welcome,
)

GPU = GpuInfo(
    index=0,
    uuid="GPU-1234",
    name="NVIDIA H100",
    memory_total_bytes=80 * 2**30,
    memory_used_bytes=2**30,
    utilization_pct=12.5,
    temperature_c=41.0,
    power_w=250.5,
    ecc_uncorrected=0,
    healthy=True,
    xids=(13, 79),
    reason="",
)
ENGINE = EngineStatus(
    engine_id="e1",
    model="tiny",
    url="http://127.0.0.1:8001",
    state="ready",
    role="prefill",
    kind="vllm",
    pid=4242,
    restarts=1,
    gpus=(0,),
    block_size=32,
    kv_events=17,
    last_error="",
)
SPEC = EngineSpec(
    engine_id="e1",
    model="tiny",
    model_path="/models/tiny",
    kind="sim",
    role="decode",
    gpus=(0, 1),
    block_size=16,
    max_model_len=2048,
    extra_args=("--enforce-eager", "--dtype", "float32"),
)
EVENTS = (
    BlockStored(
        block_hashes=(1, 2**64 - 1),
        parent_block_hash=None,
        token_ids=tuple(range(64)),
        block_size=32,
        lora_name="adapter",
        medium="GPU",
    ),
    BlockStored(
        block_hashes=(b"\x01" * 32,),
        parent_block_hash=b"\x02" * 32,
        token_ids=tuple(range(32)),
        block_size=32,
    ),
    BlockRemoved(block_hashes=(7, b"\x03" * 8), medium="CPU"),
    BlockRemoved(block_hashes=()),
    AllBlocksCleared(),
)

MESSAGES: list[Message] = [
    Register(node_id="n1", agent_url="http://n1:9000", agent_version="0.1.0"),
    Register(
        node_id="n1",
        agent_url="http://n1:9000",
        agent_version="0.1.0",
        gpus=(GPU,),
        engines=(ENGINE,),
    ),
    Welcome(coordinator_id="c1", heartbeat_interval_s=2.5),
    Heartbeat(node_id="n1", seq=0, healthy=True),
    Heartbeat(node_id="n1", seq=99, healthy=False, gpus=(GPU, GPU), engines=(ENGINE,)),
    AssignEngine(spec=SPEC),
    AssignEngine(spec=EngineSpec(engine_id="e2", model="m", model_path="/m")),
    UnassignEngine(engine_id="e1"),
    KVEventBatch(node_id="n1", engine_id="e1", seq=2**64 - 1, ts=1.7e9, events=EVENTS, dp_rank=3),
    KVEventBatch(node_id="n1", engine_id="e1", seq=0, ts=0.0),
    ErrorReport(code="bad_message", message="events[0]: nope", node_id="n1"),
    ErrorReport(code="x", message=""),
    KVSnapshot(node_id="n1", engine_id="e1", model="m", seq=-1, part=0, parts=1),
    KVSnapshot(node_id="n1", engine_id="e1", model="m", seq=41, part=2, parts=3, events=EVENTS),
    Heartbeat(
        node_id="n1",
        seq=3,
        healthy=True,
        models=(CachedModelInfo("hf://o/m@abc", 1234, pinned=True, last_used=1.7e9),),
        fetches=(
            FetchInfo("s3://b/m", "downloading", 10, 100, rate_bps=5.5, eta_s=16.4),
            FetchInfo("http://h/m/", "failed", error="not_found: 404"),
        ),
    ),
    Register(
        node_id="n1",
        agent_url="http://n1:9000",
        agent_version="0.1.0",
        models=(CachedModelInfo("s3://b/m", 1),),
        fetches=(FetchInfo("hf://o/m", "listing"),),
    ),
    PrestageModel(uri="http://127.0.0.1:8000/demo/"),
]


def _wire(msg: Message) -> dict[str, Any]:
    """The message's payload as a mutable map."""
    data = msgpack.unpackb(codec.encode(msg)[1], raw=False, strict_map_key=False)
    assert isinstance(data, dict)
    return data


def _frames(data: Any) -> list[bytes]:
    return [codec.HEADER, msgpack.packb(data, use_bin_type=True)]


def _reject(frames: list[bytes]) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        codec.decode(frames)
    return info.value


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    frames = codec.encode(msg)
    assert frames[0] == b"fleet/1"
    decoded = codec.decode(frames)
    assert decoded == msg
    assert type(decoded) is type(msg)


def test_every_message_type_is_covered() -> None:
    assert {type(m) for m in MESSAGES} == set(MESSAGE_TYPES.values())


def test_kv_batch_keeps_hash_types() -> None:
    msg = MESSAGES[8]
    assert isinstance(msg, KVEventBatch)
    decoded = codec.decode(codec.encode(msg))
    assert isinstance(decoded, KVEventBatch)
    stored = decoded.events[1]
    assert isinstance(stored, BlockStored)
    assert stored.block_hashes == (b"\x01" * 32,)
    assert isinstance(stored.block_hashes[0], bytes)
    assert isinstance(stored.token_ids, tuple)
    removed = decoded.events[2]
    assert isinstance(removed, BlockRemoved)
    assert removed.block_hashes == (7, b"\x03" * 8)


def test_int_where_float_expected_is_accepted() -> None:
    data = _wire(Welcome(coordinator_id="c", heartbeat_interval_s=1.0))
    data["heartbeat_interval_s"] = 2
    decoded = codec.decode(_frames(data))
    assert decoded == Welcome(coordinator_id="c", heartbeat_interval_s=2.0)
    assert isinstance(decoded, Welcome)
    assert type(decoded.heartbeat_interval_s) is float


def test_store_state_absent_decodes_empty_and_eta_may_be_none() -> None:
    data = _wire(Heartbeat(node_id="n", seq=1, healthy=True))
    del data["models"], data["fetches"]  # an agent that predates the model store
    assert codec.decode(_frames(data)) == Heartbeat(node_id="n", seq=1, healthy=True)
    fetch = FetchInfo("hf://o/m", "downloading", 1, 2)
    decoded = codec.decode(codec.encode(Heartbeat("n", 1, True, fetches=(fetch,))))
    assert isinstance(decoded, Heartbeat) and decoded.fetches[0].eta_s is None


def test_rejects_wrong_typed_store_state() -> None:
    data = _wire(Heartbeat("n", 1, True, models=(CachedModelInfo("u", 1),)))
    data["models"][0]["size_bytes"] = "big"
    assert _reject(_frames(data)).field == "heartbeat.models[0].size_bytes"


def test_unknown_keys_are_ignored() -> None:
    data = _wire(MESSAGES[4])
    data["added_later"] = {"x": 1}
    data["engines"][0]["also_new"] = [1, 2]
    assert codec.decode(_frames(data)) == MESSAGES[4]


def test_optional_fields_default_when_absent() -> None:
    data = {"type": "heartbeat", "node_id": "n", "seq": 1, "healthy": True}
    assert codec.decode(_frames(data)) == Heartbeat(node_id="n", seq=1, healthy=True)


@pytest.mark.parametrize("count", [0, 1, 3])
def test_rejects_wrong_frame_count(count: int) -> None:
    good = codec.encode(MESSAGES[2])
    frames = (good + [b""])[:count]
    assert "frames" in str(_reject(frames))


@pytest.mark.parametrize("header", [b"", b"fleet/2", b"fleet/0", b"FLEET/1", b"vllm"])
def test_rejects_wrong_header(header: bytes) -> None:
    frames = codec.encode(MESSAGES[2])
    err = _reject([header, frames[1]])
    assert "header" in str(err)


@pytest.mark.parametrize(
    "payload",
    [b"", b"\xc1", b"\xff\xff\xff", b"\x81\xa4type", b"\xdf\xff\xff\xff\xff"],
    ids=["empty", "never-used-byte", "garbage", "truncated-map", "huge-map-header"],
)
def test_rejects_garbage(payload: bytes) -> None:
    _reject([codec.HEADER, payload])


def test_rejects_truncated_msgpack() -> None:
    payload = codec.encode(MESSAGES[4])[1]
    for cut in (1, len(payload) // 2, len(payload) - 1):
        _reject([codec.HEADER, payload[:cut]])


def test_rejects_trailing_bytes() -> None:
    payload = codec.encode(MESSAGES[2])[1]
    _reject([codec.HEADER, payload + b"\x00"])


def test_rejects_oversized_payload() -> None:
    err = _reject([codec.HEADER, b"\x00" * (codec.MAX_FRAME_BYTES + 1)])
    assert "exceeds" in str(err)


@pytest.mark.parametrize("data", [[1, 2], "welcome", 5, None, True])
def test_rejects_payload_not_a_map(data: Any) -> None:
    assert "not a map" in str(_reject(_frames(data)))


@pytest.mark.parametrize("tag", ["nope", 1, None, "Welcome"])
def test_rejects_unknown_type(tag: Any) -> None:
    data = _wire(MESSAGES[2])
    data["type"] = tag
    assert _reject(_frames(data)).field == "type"


def test_rejects_missing_type() -> None:
    data = _wire(MESSAGES[2])
    del data["type"]
    assert _reject(_frames(data)).field == "type"


@pytest.mark.parametrize(
    ("msg", "key"),
    [
        (MESSAGES[2], "heartbeat_interval_s"),
        (MESSAGES[2], "coordinator_id"),
        (MESSAGES[3], "seq"),
        (MESSAGES[5], "spec"),
        (MESSAGES[8], "ts"),
        (MESSAGES[10], "code"),
        (MESSAGES[13], "parts"),
    ],
)
def test_rejects_missing_required_field(msg: Message, key: str) -> None:
    data = _wire(msg)
    del data[key]
    err = _reject(_frames(data))
    assert err.field == f"{type(msg).TYPE}.{key}"
    assert "missing" in str(err)


def test_rejects_missing_nested_required_field() -> None:
    data = _wire(MESSAGES[4])
    del data["gpus"][1]["uuid"]
    assert _reject(_frames(data)).field == "heartbeat.gpus[1].uuid"


def test_rejects_wrong_typed_nested_field() -> None:
    data = _wire(MESSAGES[4])
    data["engines"][0]["pid"] = "x"
    err = _reject(_frames(data))
    assert err.field == "heartbeat.engines[0].pid"
    assert "heartbeat.engines[0].pid" in str(err)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.__setitem__("node_id", 5), "heartbeat.node_id"),
        (lambda d: d.__setitem__("node_id", None), "heartbeat.node_id"),
        (lambda d: d.__setitem__("node_id", b"n1"), "heartbeat.node_id"),
        (lambda d: d.__setitem__("seq", 1.0), "heartbeat.seq"),
        (lambda d: d.__setitem__("seq", "1"), "heartbeat.seq"),
        (lambda d: d.__setitem__("gpus", "x"), "heartbeat.gpus"),
        (lambda d: d.__setitem__("gpus", {"a": 1}), "heartbeat.gpus"),
        (lambda d: d.__setitem__("engines", [5]), "heartbeat.engines[0]"),
        (lambda d: d["gpus"][0].__setitem__("xids", [1, "2"]), "heartbeat.gpus[0].xids[1]"),
        (lambda d: d["gpus"][0].__setitem__("power_w", "hot"), "heartbeat.gpus[0].power_w"),
        (lambda d: d["engines"][0].__setitem__("gpus", None), "heartbeat.engines[0].gpus"),
    ],
)
def test_rejects_wrong_types(mutate: Any, field: str) -> None:
    data = _wire(MESSAGES[4])
    mutate(data)
    assert _reject(_frames(data)).field == field


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_rejects_non_finite_floats(value: float) -> None:
    data = _wire(MESSAGES[2])
    data["heartbeat_interval_s"] = value
    err = _reject(_frames(data))
    assert err.field == "welcome.heartbeat_interval_s"
    assert "non-finite" in str(err)

    data = _wire(MESSAGES[4])
    data["gpus"][1]["temperature_c"] = value
    assert _reject(_frames(data)).field == "heartbeat.gpus[1].temperature_c"


def test_rejects_bool_where_int_expected() -> None:
    data = _wire(MESSAGES[4])
    data["seq"] = True
    err = _reject(_frames(data))
    assert err.field == "heartbeat.seq"
    assert "bool" in str(err)

    data = _wire(MESSAGES[4])
    data["engines"][0]["pid"] = False
    assert _reject(_frames(data)).field == "heartbeat.engines[0].pid"


def test_rejects_bool_where_float_expected() -> None:
    data = _wire(MESSAGES[2])
    data["heartbeat_interval_s"] = True
    assert _reject(_frames(data)).field == "welcome.heartbeat_interval_s"


def test_rejects_int_where_bool_expected() -> None:
    data = _wire(MESSAGES[4])
    data["healthy"] = 1
    assert _reject(_frames(data)).field == "heartbeat.healthy"


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda evs: evs[0].__setitem__("type", "BlockUpdated"), "kv.events[0].type"),
        (lambda evs: evs[0].pop("type"), "kv.events[0].type"),
        (lambda evs: evs.__setitem__(0, ["AllBlocksCleared"]), "kv.events[0]"),
        (lambda evs: evs[0]["block_hashes"].__setitem__(1, "x"), "kv.events[0].block_hashes"),
        (lambda evs: evs[0]["block_hashes"].__setitem__(0, True), "kv.events[0].block_hashes"),
        (
            lambda evs: evs[0].__setitem__("parent_block_hash", 1.5),
            "kv.events[0].parent_block_hash",
        ),
        (lambda evs: evs[1]["token_ids"].__setitem__(3, None), "kv.events[1].token_ids[3]"),
        (lambda evs: evs[2].pop("block_hashes"), "kv.events[2].block_hashes"),
        (lambda evs: evs[2].__setitem__("medium", 3), "kv.events[2].medium"),
    ],
)
def test_rejects_bad_kv_events(mutate: Any, field: str) -> None:
    data = _wire(MESSAGES[8])
    mutate(data["events"])
    err = _reject(_frames(data))
    assert err.field.startswith(field), (err.field, field)


def test_rejects_non_finite_kv_timestamp() -> None:
    data = _wire(MESSAGES[8])
    data["ts"] = math.nan
    assert _reject(_frames(data)).field == "kv.ts"


def test_error_message_names_the_field() -> None:
    data = _wire(MESSAGES[4])
    data["gpus"][0]["healthy"] = "yes"
    err = _reject(_frames(data))
    assert str(err).startswith("heartbeat.gpus[0].healthy: ")
