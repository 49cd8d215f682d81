"""The simulator against one real vLLM 0.32 CPU engine: same requests, same answers' shapes.

One real engine and one simulator serve the demo model, both started with the exact argv the
agent builds (:func:`fleet.agent.launcher.engine_command`, kinds ``vllm`` and ``sim``), each
publishing KV events to a SUB socket this module binds, with a replay socket. The module sends
both the same sequence of requests, one at a time, and compares:

* JSON shapes (keys, nesting, value types) of ``/v1/models``, completions, chat completions,
  ``/tokenize`` and ``/detokenize``, and of every kind of streamed chunk (role, content,
  finishing and usage chunks; with and without ``include_usage`` and ``continuous_usage_stats``);
  the SSE framing (``data: `` lines, ``data: [DONE]`` last) and content types;
* token ids from ``/tokenize`` (plain and chat template) and ``/detokenize`` text: identical;
* ``/v1/completions/render`` and ``/v1/chat/completions/render`` (both engines run with
  ``--enable-scale-out``): answers byte for byte, sampling parameters and errors included;
* error bodies for bad requests (and unknown routes, wrong methods): status and body, byte for
  byte;
* ``/metrics``: for vLLM's core families the sample names and label sets, the TTFT buckets,
  ``vllm:cache_config_info``'s label names, and the prefix-cache and success counters' values;
* the KV-event stream: 3 frames, topic, sequence numbers from 0, payload layout, event types
  and their keys in order with value types, block size, parent chaining, and the block hashes of
  prompt blocks (identical: same algorithm and seed), then the replay socket's replies.

Any difference fails. Only one real engine is started (module scope), about 40 s.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from fleet.agent.launcher import LaunchConfig, engine_command, engine_env, free_port
from fleet.protocol.kvevents import BlockRemoved, BlockStored
from fleet.protocol.messages import EngineSpec
from fleet.protocol.vllm_events import (
    REPLAY_END_SEQ,
    VllmEventBatch,
    decode_replay_reply,
    decode_vllm_message,
)
from fleet.protocol.vllm_events_encode import encode_replay_request

pytestmark = pytest.mark.engine

MODEL = "demo"
BLOCK = 32
START_TIMEOUT_S = 420.0
LONG = "Fleet routes every request to the engine that holds the longest prefix of its prompt. " * 3
MARKER = "Zebra quartz jukebox fjord nymph vex wizard glyph. " * 6
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there, fleet!"},
]
CORE_FAMILIES = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries",
    "vllm:prefix_cache_hits",
    "vllm:request_success",
    "vllm:time_to_first_token_seconds",
    "vllm:cache_config_info",
)


class EngineProcess:
    """An engine process (own session) with its output collected line by line."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            list(argv),
            env={**env, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._log.write(line)
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout_s: float) -> None:
        """Wait for an output line matching ``pattern``; fail if the process exits first."""
        regex, index = re.compile(pattern), 0
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for line in self.lines[index:]:
                    if regex.search(line):
                        return
                index = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    tail = "".join(self.lines[-30:])
                    raise AssertionError(f"no line matching {pattern!r}:\n{tail}")
                self._cond.wait(timeout=left)

    def stop(self) -> None:
        """SIGTERM the whole group, then SIGKILL what is left after 15 s."""
        for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 15.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        self._reader.join(timeout=5)
        self._log.close()


@dataclass
class Engine:
    """One engine under comparison, and what it answered."""

    name: str
    url: str
    sub: zmq.Socket[bytes]
    replay_endpoint: str
    http: httpx.Client
    answers: dict[str, httpx.Response] = field(default_factory=dict)
    streams: dict[str, list[str]] = field(default_factory=dict)
    frames: list[list[bytes]] = field(default_factory=list)

    def post(self, name: str, path: str, body: Any = None, *, raw: bytes | None = None) -> None:
        if path in (C, CH) and isinstance(body, dict):
            body = {**body, "ignore_eos": True}  # the real model must not stop early at random
        if raw is not None:
            headers = {"content-type": "application/json"}
            self.answers[name] = self.http.post(path, content=raw, headers=headers)
        else:
            self.answers[name] = self.http.post(path, json=body)

    def stream(self, name: str, path: str, body: dict[str, Any]) -> None:
        body = {**body, "ignore_eos": True}
        with self.http.stream("POST", path, json=body) as response:
            response.read()
        self.answers[name] = response
        self.streams[name] = response.text.split("\n\n")

    def kv_until(
        self, ctx: zmq.Context[zmq.Socket[bytes]], marker_tokens: Sequence[int]
    ) -> list[VllmEventBatch]:
        """Every KV batch up to and including the one storing ``marker_tokens``' first block.

        A batch a PUB sent before the subscription reached it is lost (ZMQ's slow joiner); such
        a gap is filled from the replay socket, as Fleet's relay does.
        """
        head = tuple(marker_tokens[:BLOCK])
        while True:
            assert self.sub.poll(30_000), f"{self.name}: no KV batch within 30 s"
            frames = self.sub.recv_multipart()
            seq = int.from_bytes(frames[1], "big")
            if seq > len(self.frames):
                missing = self.replay(ctx, len(self.frames))[: seq - len(self.frames)]
                self.frames.extend([r[1:] for r in missing])
            self.frames.append(frames)
            batch = decode_vllm_message(frames)
            for event in batch.events:
                if isinstance(event, BlockStored) and event.token_ids[:BLOCK] == head:
                    return [decode_vllm_message(f) for f in self.frames]

    def replay(self, ctx: zmq.Context[zmq.Socket[bytes]], start: int) -> list[list[bytes]]:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        try:
            dealer.connect(self.replay_endpoint)
            dealer.send_multipart(encode_replay_request(start))
            replies = []
            while True:
                assert dealer.poll(10_000), f"{self.name}: no replay reply within 10 s"
                frames = dealer.recv_multipart()
                replies.append(frames)
                if frames[2] == REPLAY_END_SEQ:
                    return replies
        finally:
            dealer.close(linger=0)


@dataclass
class Pair:
    real: Engine
    sim: Engine
    ctx: zmq.Context[zmq.Socket[bytes]]
    batches: dict[str, list[VllmEventBatch]] = field(default_factory=dict)

    def both(self) -> tuple[Engine, Engine]:
        return self.real, self.sim


def _argv(kind: str, demo_model: Path, sub_port: int) -> tuple[list[str], dict[str, str], int]:
    spec = EngineSpec(
        engine_id=kind, model=MODEL, model_path=str(demo_model), kind=kind, block_size=BLOCK
    )
    launch = LaunchConfig(python=sys.executable)
    port = free_port()
    argv = engine_command(spec, launch, port=port, kv_endpoint=f"tcp://127.0.0.1:{sub_port}")
    i = argv.index("--kv-events-config")
    kv = json.loads(argv[i + 1])
    kv["replay_endpoint"] = f"tcp://127.0.0.1:{free_port()}"
    argv[i + 1] = json.dumps(kv)
    if kind == "sim":  # hash like this vLLM does, to compare the algorithm (default: random)
        argv += ["--sim-hash-seed", "vllm"]
    argv += ["--enable-scale-out"]  # the /render routes routers tokenize through
    return argv, engine_env(spec, launch, gpu_uuids={}), port


def _exchange(engine: Engine) -> None:
    """The request sequence, sent to one engine, one request at a time."""
    http = engine.http
    engine.answers["health"] = http.get("/health")
    engine.answers["version"] = http.get("/version")
    engine.answers["models"] = http.get("/v1/models")
    engine.answers["load"] = http.get("/load")
    engine.answers["kv_event_sources"] = http.get("/kv_event_sources")
    engine.post("tokenize", "/tokenize", {"model": MODEL, "prompt": LONG})
    engine.post("tokenize_strs", "/tokenize", {"prompt": "Hello, fleet", "return_token_strs": True})
    engine.post("tokenize_chat", "/tokenize", {"model": MODEL, "messages": MESSAGES})
    engine.post("detokenize", "/detokenize", {"model": MODEL, "tokens": [0, 300, 301, 302, 1]})
    engine.post("completion", "/v1/completions", {"model": MODEL, "prompt": LONG, "max_tokens": 8})
    engine.post(
        "completion_again", "/v1/completions", {"model": MODEL, "prompt": LONG, "max_tokens": 3}
    )
    ids = list(range(3, 3 + 2 * BLOCK))  # exactly two blocks
    for name in ("ids", "ids_again"):
        engine.post(name, "/v1/completions", {"model": MODEL, "prompt": ids, "max_tokens": 2})
    engine.post(
        "completion_fill", "/v1/completions", {"model": MODEL, "prompt": "Fill", "max_tokens": 40}
    )
    engine.post(
        "chat", "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 6}
    )
    engine.post(
        "chat_mct",
        "/v1/chat/completions",
        {"model": MODEL, "messages": MESSAGES, "max_completion_tokens": 5},
    )
    stream_cases = [
        ("cmpl_stream", "/v1/completions", {"prompt": "Stream me", "max_tokens": 4}, None),
        ("cmpl_usage", "/v1/completions", {"prompt": "Stream me", "max_tokens": 4}, False),
        ("cmpl_cont", "/v1/completions", {"prompt": "Stream me", "max_tokens": 3}, True),
        ("chat_stream", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4}, None),
        ("chat_usage", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4}, False),
        ("chat_cont", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 3}, True),
    ]
    for name, path, body, continuous in stream_cases:
        body = {"model": MODEL, **body, "stream": True}
        if continuous is not None:
            body["stream_options"] = {"include_usage": True, "continuous_usage_stats": continuous}
        engine.stream(name, path, body)
    for name, path, raw in BAD_REQUESTS:
        engine.post(name, path, raw=raw)
    for name, path, body in RENDER_REQUESTS:
        # the same X-Request-Id makes the answers' request_id equal too
        engine.answers[name] = http.post(path, json=body, headers={"x-request-id": name})
    engine.answers["render_get"] = http.get(R)
    engine.answers["not_found"] = http.get("/no/such/route")
    engine.answers["wrong_method"] = http.get("/v1/completions")
    engine.post("marker", "/v1/completions", {"model": MODEL, "prompt": MARKER, "max_tokens": 1})
    engine.answers["metrics"] = http.get("/metrics")


C, CH = "/v1/completions", "/v1/chat/completions"
BAD_REQUESTS: list[tuple[str, str, bytes]] = [
    ("bad_json", C, b"{not json"),
    ("bad_empty", C, b""),
    ("bad_array", C, b"[1, 2]"),
    ("bad_model", C, b'{"model": "nope", "prompt": "x", "max_tokens": 2}'),
    ("bad_chat_model", CH, b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}'),
    ("bad_no_prompt", C, b'{"model": "demo", "max_tokens": 2}'),
    ("bad_prompt_number", C, b'{"model": "demo", "prompt": 5}'),
    ("bad_max_tokens_0", C, b'{"model": "demo", "prompt": "x", "max_tokens": 0}'),
    ("bad_max_tokens_neg", C, b'{"model": "demo", "prompt": "x", "max_tokens": -1}'),
    ("bad_max_tokens_str", C, b'{"model": "demo", "prompt": "x", "max_tokens": "a"}'),
    ("bad_max_tokens_huge", C, b'{"model": "demo", "prompt": "x", "max_tokens": 5000}'),
    ("bad_too_long", C, json.dumps({"model": "demo", "prompt": "x " * 1100}).encode()),
    ("bad_temperature", C, b'{"model": "demo", "prompt": "x", "temperature": -1}'),
    ("bad_nan", C, b'{"model": "demo", "prompt": "x", "temperature": NaN}'),
    (
        "bad_stream_options",
        C,
        b'{"model": "demo", "prompt": "x", "stream_options": {"include_usage": true}}',
    ),
    ("bad_n0", C, b'{"model": "demo", "prompt": "x", "n": 0}'),
    ("bad_messages_str", CH, b'{"model": "demo", "messages": "hi"}'),
    ("bad_messages_missing", CH, b'{"model": "demo"}'),
    ("bad_messages_empty", CH, b'{"model": "demo", "messages": []}'),
    ("bad_tokenize", "/tokenize", b'{"model": "demo"}'),
]


R, RCH = "/v1/completions/render", "/v1/chat/completions/render"
RENDER_REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("r_cmpl", R, {"model": MODEL, "prompt": "hello there", "max_tokens": 5}),
    ("r_cmpl_default", R, {"model": MODEL, "prompt": LONG}),
    ("r_cmpl_batch", R, {"model": MODEL, "prompt": ["a b", "c d"]}),
    ("r_cmpl_ids", R, {"model": MODEL, "prompt": [3, 4, 5]}),
    (
        "r_cmpl_greedy",
        R,
        {
            **{"model": MODEL, "prompt": "hello", "max_tokens": 5, "temperature": 0, "seed": 3},
            **{"stop": ["x"], "top_k": 5, "stream": True},
            "stream_options": {"include_usage": True},
        },
    ),
    (
        "r_cmpl_sampling",
        R,
        {
            **{"model": MODEL, "prompt": "hello", "n": 2, "temperature": 0.7, "top_p": 0.9},
            **{"top_k": 4, "min_p": 0.1, "logprobs": 2, "ignore_eos": True, "min_tokens": 2},
            **{"presence_penalty": 0.5, "stop": "y", "max_tokens": 16},
        },
    ),
    ("r_chat", RCH, {"model": MODEL, "messages": MESSAGES}),
    (
        "r_chat_max",
        RCH,
        {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "add_generation_prompt": False},
    ),
    (
        "r_chat_stream",
        RCH,
        {"messages": MESSAGES, "temperature": 0, "stream": True, "max_completion_tokens": 7},
    ),
    (
        "r_chat_logprobs",
        RCH,
        {
            **{"model": MODEL, "messages": MESSAGES, "logprobs": True, "top_logprobs": 2},
            **{"stream": True, "stream_options": {"continuous_usage_stats": True}},
        },
    ),
    ("r_bad_model", R, {"model": "nope", "prompt": "a"}),
    ("r_bad_chat_empty", RCH, {"model": MODEL, "messages": []}),
    ("r_bad_max_tokens", R, {"model": MODEL, "prompt": "x", "max_tokens": 5000}),
    ("r_bad_greedy_n", R, {"model": MODEL, "prompt": "x", "n": 2, "temperature": 0}),
]


@pytest.fixture(scope="module")
def pair(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    logs = tmp_path_factory.mktemp("sim-equivalence")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    subs: list[zmq.Socket[bytes]] = []
    procs: list[EngineProcess] = []
    clients: list[httpx.Client] = []
    try:
        engines = []
        for kind in ("vllm", "sim"):
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            subs.append(sub)
            argv, env, port = _argv(kind, demo_model, sub.bind_to_random_port("tcp://127.0.0.1"))
            kv = json.loads(argv[argv.index("--kv-events-config") + 1])
            procs.append(EngineProcess(argv, env, logs / f"{kind}.log"))
            # uvicorn logs "Application startup complete" just before it listens: let the
            # client's own connect retries cover those milliseconds.
            transport = httpx.HTTPTransport(retries=3)
            client = httpx.Client(
                base_url=f"http://127.0.0.1:{port}", timeout=60, transport=transport
            )
            clients.append(client)
            url = f"http://127.0.0.1:{port}"
            engines.append(Engine(kind, url, sub, kv["replay_endpoint"], client))
        procs[1].wait_for(r"fleet-sim: serving", 60)
        procs[0].wait_for(r"Application startup complete", START_TIMEOUT_S)
        for sub in subs:
            sub.getsockopt(zmq.EVENTS)  # a SUB sends its subscription when it processes commands
        pair = Pair(engines[0], engines[1], ctx)
        for engine in pair.both():
            _exchange(engine)
            marker = engine.http.post("/tokenize", json={"prompt": MARKER}).json()["tokens"]
            pair.batches[engine.name] = engine.kv_until(ctx, marker)
        yield pair
    finally:
        for proc in procs:
            proc.stop()
        for client in clients:
            client.close()
        for sub in subs:
            sub.close(linger=0)
        ctx.term()


# -- helpers ------------------------------------------------------------------------------------


def _shape(value: Any) -> Any:
    """The JSON structure of a value: keys (in order), nesting and value types, not contents."""
    if isinstance(value, dict):
        return [(k, _shape(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [_shape(value[0])] if value else []
    return type(value).__name__


def _chunk_shapes(events: list[str]) -> list[Any]:
    """Shapes of an SSE stream's chunks, consecutive repeats collapsed (vLLM may merge tokens)."""
    assert events[-2:] == ["data: [DONE]", ""], events[-3:]
    assert all(e.startswith("data: ") for e in events[:-1])
    shapes: list[Any] = []
    for event in events[:-2]:
        shape = _shape(json.loads(event.removeprefix("data: ")))
        if not shapes or shapes[-1] != shape:
            shapes.append(shape)
    return shapes


# -- the OpenAI API -----------------------------------------------------------------------------

JSON_ANSWERS = [
    "models",
    "load",
    "kv_event_sources",
    "tokenize",
    "tokenize_strs",
    "tokenize_chat",
    "detokenize",
    "completion",
    "completion_again",
    "ids",
    "completion_fill",
    "chat",
    "chat_mct",
    "marker",
]


@pytest.mark.parametrize("name", JSON_ANSWERS)
def test_json_answers_have_vllms_shape(pair: Pair, name: str) -> None:
    real, sim = pair.real.answers[name], pair.sim.answers[name]
    assert (sim.status_code, sim.headers["content-type"]) == (
        real.status_code,
        real.headers["content-type"],
    )
    assert _shape(sim.json()) == _shape(real.json())


def test_usage_and_finish_reason_agree(pair: Pair) -> None:
    for name in ("completion", "completion_again", "ids", "completion_fill", "chat", "chat_mct"):
        real, sim = pair.real.answers[name].json(), pair.sim.answers[name].json()
        assert sim["usage"] == real["usage"], name
        assert sim["choices"][0]["finish_reason"] == real["choices"][0]["finish_reason"] == "length"


def test_tokenizer_and_chat_template_give_the_same_ids(pair: Pair) -> None:
    for name in ("tokenize", "tokenize_strs", "tokenize_chat", "detokenize"):
        assert pair.sim.answers[name].json() == pair.real.answers[name].json(), name


@pytest.mark.parametrize(
    "name", ["cmpl_stream", "cmpl_usage", "cmpl_cont", "chat_stream", "chat_usage", "chat_cont"]
)
def test_streamed_chunks_have_vllms_shapes(pair: Pair, name: str) -> None:
    real, sim = pair.real.answers[name], pair.sim.answers[name]
    assert sim.headers["content-type"] == real.headers["content-type"]
    assert _chunk_shapes(pair.sim.streams[name]) == _chunk_shapes(pair.real.streams[name])


def test_health_and_version(pair: Pair) -> None:
    for name in ("health", "version"):
        real, sim = pair.real.answers[name], pair.sim.answers[name]
        assert (sim.status_code, sim.content) == (real.status_code, real.content), name


@pytest.mark.parametrize("name", [b[0] for b in BAD_REQUESTS] + ["not_found", "wrong_method"])
def test_errors_are_vllms_byte_for_byte(pair: Pair, name: str) -> None:
    real, sim = pair.real.answers[name], pair.sim.answers[name]
    assert sim.status_code == real.status_code
    assert sim.content == real.content


@pytest.mark.parametrize("name", [r[0] for r in RENDER_REQUESTS] + ["render_get"])
def test_render_answers_are_vllms_byte_for_byte(pair: Pair, name: str) -> None:
    """``/render`` (``--enable-scale-out``): token ids, sampling params, errors, all of it."""
    real, sim = pair.real.answers[name], pair.sim.answers[name]
    assert (sim.status_code, sim.headers["content-type"]) == (
        real.status_code,
        real.headers["content-type"],
    )
    assert sim.content == real.content


# -- metrics ------------------------------------------------------------------------------------


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _label_sets(family: Any) -> set[tuple[str, tuple[str, ...]]]:
    return {(s.name, tuple(sorted(s.labels))) for s in family.samples}


@pytest.mark.parametrize("name", CORE_FAMILIES)
def test_metric_families_have_vllms_names_and_labels(pair: Pair, name: str) -> None:
    real = _families(pair.real.answers["metrics"].text)
    sim = _families(pair.sim.answers["metrics"].text)
    assert name in real and name in sim
    assert (sim[name].type, sim[name].documentation) == (real[name].type, real[name].documentation)
    assert _label_sets(sim[name]) == _label_sets(real[name])


def test_metric_values_that_must_agree(pair: Pair) -> None:
    def values(engine: Engine) -> dict[tuple[str, str], float]:
        out = {}
        for family in text_string_to_metric_families(engine.answers["metrics"].text):
            for s in family.samples:
                if s.name in (
                    "vllm:prefix_cache_queries_total",
                    "vllm:prefix_cache_hits_total",
                    "vllm:request_success_total",
                    "vllm:time_to_first_token_seconds_count",
                ):
                    out[(s.name, s.labels.get("finished_reason", ""))] = s.value
                if s.name == "vllm:time_to_first_token_seconds_bucket":
                    out[(s.name, s.labels["le"])] = 0.0  # the buckets, not their counts
        return out

    assert values(pair.sim) == values(pair.real)


# -- KV events ----------------------------------------------------------------------------------


def _raw_events(frames: list[bytes]) -> list[dict[str, Any]]:
    payload = msgpack.unpackb(frames[2], raw=False, strict_map_key=False)
    assert isinstance(payload, list) and len(payload) == 3
    assert [type(x).__name__ for x in payload] == ["float", "list", "int"]
    return list(payload[1])


def test_kv_messages_have_vllms_frames_and_payload(pair: Pair) -> None:
    for engine in pair.both():
        for seq, frames in enumerate(engine.frames):
            assert len(frames) == 3 and frames[0] == b"kv" and len(frames[1]) == 8
            assert int.from_bytes(frames[1], "big") == seq, engine.name
    real_events = [e for f in pair.real.frames for e in _raw_events(f)]
    sim_events = [e for f in pair.sim.frames for e in _raw_events(f)]
    assert [list(e) for e in sim_events] == [list(e) for e in real_events]  # keys, in order
    assert [_shape(e) for e in sim_events] == [_shape(e) for e in real_events]


def _outline(event: Any) -> tuple[Any, ...]:
    if isinstance(event, BlockStored):
        return (
            "BlockStored",
            len(event.block_hashes),
            event.parent_block_hash is None,
            event.block_size,
            len(event.token_ids),
            event.medium,
        )
    if isinstance(event, BlockRemoved):
        return ("BlockRemoved", len(event.block_hashes), event.medium)
    return (type(event).__name__,)


def test_kv_event_streams_agree_step_by_step(pair: Pair) -> None:
    real, sim = pair.batches["vllm"], pair.batches["sim"]
    assert [[_outline(e) for e in b.events] for b in sim] == [
        [_outline(e) for e in b.events] for b in real
    ]


def test_prompt_blocks_hash_identically_and_chain(pair: Pair) -> None:
    real_tokens = pair.real.answers["tokenize"].json()["tokens"]
    stored: dict[str, dict[tuple[int, ...], int]] = {}
    for name in ("vllm", "sim"):
        seen: set[int] = set()
        by_tokens: dict[tuple[int, ...], int] = {}
        for batch in pair.batches[name]:
            for event in batch.events:
                if not isinstance(event, BlockStored):
                    continue
                parent = event.parent_block_hash
                assert parent is None or parent in seen, f"{name}: parent never stored"
                for i, h in enumerate(event.block_hashes):
                    block = event.token_ids[i * BLOCK : (i + 1) * BLOCK]
                    by_tokens[tuple(block)] = int(h)
                    seen.add(int(h))
        stored[name] = by_tokens
    prompt_block = tuple(real_tokens[:BLOCK])
    assert stored["sim"][prompt_block] == stored["vllm"][prompt_block]
    shared = set(stored["sim"]) & set(stored["vllm"])
    assert len(shared) >= 4  # LONG's blocks, the id prompt's and the marker's
    assert {t: stored["sim"][t] for t in shared} == {t: stored["vllm"][t] for t in shared}


def test_replay_answers_like_vllm(pair: Pair) -> None:
    for engine in pair.both():
        replies = engine.replay(pair.ctx, 0)
        assert [len(r) for r in replies] == [4] * len(replies)
        assert decode_replay_reply(replies[-1]) is None
        batches = [decode_replay_reply(r) for r in replies[:-1]]
        assert batches == pair.batches[engine.name][: len(batches)]
        assert len(batches) == len(engine.frames), engine.name
        past = engine.replay(pair.ctx, 10**6)
        assert past == [[b"", b"", REPLAY_END_SEQ, b""]]
