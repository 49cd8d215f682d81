"""The simulator over real sockets: HTTP (openai client and raw SSE), /metrics, /sim/faults, KV
events on a real SUB socket, replay through a DEALER, and the process itself.

Most tests run a :class:`SimServer` in the test's own trio run on 127.0.0.1 port 0, publishing
KV events to a SUB socket the test binds (the agent's arrangement: the engine connects). The
last ones start ``python -m fleet.agent.sim`` as a real child process. Waiting is on events:
the server's ``started``, the engine's activity event, ZMQ's handshake monitor, a child's exit.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
import zmq
from zmq.utils.monitor import parse_monitor_message

from fleet.agent.launcher import LaunchConfig, engine_command
from fleet.agent.sim.cache import external_hash, hash_block, none_hash
from fleet.agent.sim.config import parse_args
from fleet.agent.sim.server import SimServer
from fleet.agent.supervisor import EngineSupervisor, SupervisorConfig
from fleet.protocol.kvevents import AllBlocksCleared, BlockStored
from fleet.protocol.messages import EngineSpec
from fleet.protocol.vllm_events import (
    VllmEventBatch,
    decode_replay_reply,
    decode_vllm_message,
)
from fleet.protocol.vllm_events_encode import encode_replay_request
from fleet.protocol.zmqio import open_socket, recv_batch, send_nowait

MODEL = "demo"
BLOCK = 32
LONG_PROMPT = (
    "Fleet routes every request to the engine that already holds the longest prefix of its "
    "prompt, unless that engine is overloaded. "
) * 3
FAST = ["--sim-prefill-ms-per-token", "0.01", "--sim-decode-ms-per-token", "1"]


@dataclass
class Sim:
    server: SimServer
    url: str
    http: httpx.AsyncClient
    client: openai.AsyncOpenAI
    sub: zmq.Socket[bytes]
    ctx: zmq.Context[zmq.Socket[bytes]]
    next_seq: int = 0
    pending: list[VllmEventBatch] = field(default_factory=list)

    async def batch(self) -> VllmEventBatch:
        """The next KV batch in sequence order.

        A PUB socket drops what it sends before the subscriber's subscription has reached it
        (ZMQ's slow joiner); like Fleet's relay, a gap is filled from the replay socket.
        """
        if not self.pending:
            (frames,) = await recv_batch(self.sub, max_messages=1)
            live = decode_vllm_message(frames)
            if live.seq > self.next_seq:
                self.pending = (await self.replay(self.next_seq))[: live.seq - self.next_seq]
            self.pending.append(live)
        batch = self.pending.pop(0)
        self.next_seq = batch.seq + 1
        return batch

    async def replay(self, start: int) -> list[VllmEventBatch]:
        """Every buffered batch from ``start`` on, through a DEALER on the replay socket."""
        sources = (await self.http.get("/kv_event_sources")).json()
        with open_socket(self.ctx, zmq.DEALER) as dealer:
            dealer.connect(sources["0"]["replay_endpoint"])
            assert send_nowait(dealer, encode_replay_request(start))
            got: list[VllmEventBatch] = []
            while True:
                for frames in await recv_batch(dealer):
                    reply = decode_replay_reply(frames)
                    if reply is None:
                        return got
                    got.append(reply)

    async def tokens(self, prompt: str) -> list[int]:
        r = await self.http.post("/tokenize", json={"model": MODEL, "prompt": prompt})
        return list(r.json()["tokens"])

    async def faults(self, **changes: Any) -> httpx.Response:
        return await self.http.post("/sim/faults", json=changes)


@contextmanager
def _handshake_monitor(sock: zmq.Socket[bytes]) -> Iterator[zmq.Socket[bytes]]:
    """A monitor of ``sock``'s ZMTP handshakes, attached before any peer can connect."""
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        yield monitor
    finally:
        sock.disable_monitor()
        trio.lowlevel.notify_closing(monitor.getsockopt(zmq.FD))  # type: ignore[arg-type]
        monitor.close(linger=0)


async def _handshake(monitor: zmq.Socket[bytes]) -> None:
    """Wait until a peer has completed the handshake (so PUB messages are no longer dropped)."""
    (frames,) = await recv_batch(monitor, max_messages=1)
    assert parse_monitor_message(frames)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED


def _argv(demo_model: Path, kv_endpoint: str, *extra: str) -> list[str]:
    spec = EngineSpec(engine_id="s", model=MODEL, model_path=str(demo_model), kind="sim")
    argv = engine_command(spec, LaunchConfig(), port=0, kv_endpoint=kv_endpoint)
    i = argv.index("--kv-events-config")
    kv = json.loads(argv[i + 1])
    kv["replay_endpoint"] = "tcp://127.0.0.1:0"
    argv[i + 1] = json.dumps(kv)
    return [*argv[3:], *FAST, *extra]


@pytest.fixture
async def sim(demo_model: Path, nursery: trio.Nursery) -> AsyncIterator[Sim]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with open_socket(ctx, zmq.SUB) as sub:
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        port = sub.bind_to_random_port("tcp://127.0.0.1")
        server = SimServer(parse_args(_argv(demo_model, f"tcp://127.0.0.1:{port}")), grace_s=0.5)
        with _handshake_monitor(sub) as monitor:
            url = await nursery.start(server.run)
            await _handshake(monitor)
        sub.getsockopt(zmq.EVENTS)  # the SUB sends its subscription when it processes commands
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            yield Sim(server, url, http, client, sub, ctx)
            await client.close()
        nursery.cancel_scope.cancel()
    ctx.term()


# -- the OpenAI API -----------------------------------------------------------------------------


async def test_models_completion_and_chat_through_the_openai_client(sim: Sim) -> None:
    assert [m.id for m in (await sim.client.models.list()).data] == [MODEL]
    completion = await sim.client.completions.create(model=MODEL, prompt="Hello", max_tokens=5)
    assert completion.id.startswith("cmpl-") and completion.model == MODEL
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    assert completion.usage.prompt_tokens == len(await sim.tokens("Hello"))
    assert completion.choices[0].finish_reason == "length" and completion.choices[0].text
    assert completion.system_fingerprint and completion.system_fingerprint.startswith(
        "vllm-0.32.0-"
    )
    chat = await sim.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=3
    )
    assert chat.id.startswith("chatcmpl-") and chat.choices[0].message.role == "assistant"
    assert chat.usage is not None and chat.usage.completion_tokens == 3


async def test_completions_default_to_16_tokens_and_chat_to_the_rest_of_the_context(
    sim: Sim,
) -> None:
    r = await sim.http.post("/v1/completions", json={"prompt": "x"})
    assert r.json()["usage"]["completion_tokens"] == 16 and r.json()["model"] == MODEL
    tokens = await sim.http.post("/tokenize", json={"messages": [{"role": "user", "content": "x"}]})
    prompt = tokens.json()["count"]
    r = await sim.http.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
    )
    assert r.json()["usage"]["completion_tokens"] == 1024 - prompt


async def test_streamed_completion_frames_like_vllm(sim: Sim) -> None:
    body = {
        "model": MODEL,
        "prompt": "Stream me",
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with sim.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
        raw = (await r.aread()).decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: ") for e in events[:-1])
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert len(chunks) == 5
    assert [c["choices"][0]["finish_reason"] for c in chunks[:4]] == [None, None, None, "length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert "system_fingerprint" in chunks[-1] and "system_fingerprint" not in chunks[3]


async def test_streamed_chat_through_the_openai_client(sim: Sim) -> None:
    stream = await sim.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        stream=True,
        extra_body={"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks[1:4]] == [None, None, "length"]
    assert [c.usage.completion_tokens for c in chunks if c.usage] == [0, 1, 2, 3, 3]


async def test_a_stop_string_finishes_with_stop(sim: Sim) -> None:
    first = await sim.http.post(
        "/v1/completions", json={"prompt": "Hi", "max_tokens": 8, "temperature": 0}
    )
    text = first.json()["choices"][0]["text"]
    stop = text[len(text) // 2 :][:3]
    again = await sim.http.post(
        "/v1/completions", json={"prompt": "Hi", "max_tokens": 8, "temperature": 0, "stop": stop}
    )
    choice = again.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    assert choice["text"] == text[: text.index(stop)]


async def test_tokenize_and_detokenize(sim: Sim) -> None:
    r = await sim.http.post("/tokenize", json={"prompt": "Hello, fleet", "return_token_strs": True})
    body = r.json()
    assert body == {
        "count": 8,
        "max_model_len": 1024,
        "tokens": [0, 42, 485, 81, 14, 269, 296, 288],
        "token_strs": ["<s>", "H", "ell", "o", ",", "Ġf", "le", "et"],
    }
    r = await sim.http.post("/detokenize", json={"tokens": [0, 300, 301, 302, 1]})
    assert r.json() == {"prompt": "<s>seelly</s>"}


CMPL, CHAT, BR, BRE = "/v1/completions", "/v1/chat/completions", "Bad Request", "BadRequestError"
BAD = [
    (CMPL, b"{not json", 400, BR, "body.1"),
    (CMPL, b"", 400, BR, "body"),
    (CMPL, b"[1, 2]", 400, BR, "body"),
    (CMPL, b'{"model": "nope", "prompt": "x"}', 404, "NotFoundError", "model"),
    (CMPL, b'{"max_tokens": 2}', 400, BRE, "prompt"),
    (CMPL, b'{"prompt": 5}', 400, BR, "body.prompt"),
    (CMPL, b'{"prompt": "x", "max_tokens": 0}', 400, BRE, "max_tokens"),
    (CMPL, b'{"prompt": "x", "max_tokens": "a"}', 400, BR, "body.max_tokens"),
    (CMPL, b'{"prompt": "x", "max_tokens": 5000}', 400, BRE, "max_tokens"),
    (CMPL, b'{"prompt": "x", "n": 2}', 400, BRE, "n"),
    (CMPL, b'{"prompt": "x", "temperature": -1}', 400, BRE, "temperature"),
    (CMPL, b'{"prompt": "x", "temperature": NaN}', 400, BRE, "temperature"),
    (
        CMPL,
        b'{"prompt": "x", "stream_options": {"include_usage": true}}',
        400,
        BRE,
        "stream_options",
    ),
    (CHAT, b'{"messages": "hi"}', 400, BR, "body.messages"),
    (CHAT, b'{"model": "demo"}', 400, BR, "body.messages"),
    (CHAT, b'{"messages": []}', 400, BRE, None),
]


async def test_render_routes_answer_403_without_enable_scale_out(sim: Sim) -> None:
    for path in ("/v1/completions/render", "/v1/chat/completions/render"):
        r = await sim.http.post(path, json={"model": MODEL, "prompt": "x"})
        assert r.status_code == 403
        assert r.json()["error"]["type"] == "PermissionDeniedError"
        assert "--enable-scale-out" in r.json()["error"]["message"]


async def test_render_routes_give_the_tokens_generation_would_use(
    demo_model: Path, nursery: trio.Nursery
) -> None:
    argv = _argv(demo_model, "tcp://127.0.0.1:9", "--enable-scale-out")
    url = await nursery.start(SimServer(parse_args(argv), grace_s=0.5).run)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    async with httpx.AsyncClient(base_url=url) as http:
        chat = await http.post("/v1/chat/completions/render", json={"messages": messages})
        expected = await http.post("/tokenize", json={"messages": messages})
        assert chat.status_code == 200
        assert chat.json()["token_ids"] == expected.json()["tokens"]
        assert chat.json()["sampling_params"]["max_tokens"] == 1024 - expected.json()["count"]
        batch = await http.post(
            "/v1/completions/render",
            json={"model": MODEL, "prompt": ["one", "two"]},
            headers={"x-request-id": "abc"},
        )
        assert [g["request_id"] for g in batch.json()] == ["cmpl-abc-0", "cmpl-abc-1"]
        for item, prompt in zip(batch.json(), ["one", "two"], strict=True):
            tokens = await http.post("/tokenize", json={"prompt": prompt})
            assert item["token_ids"] == tokens.json()["tokens"]
        bad = await http.post("/v1/completions/render", json={"model": "nope", "prompt": "x"})
        assert bad.status_code == 404 and bad.json()["error"]["param"] == "model"
    nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("path", "raw", "status", "kind", "param"), BAD)
async def test_bad_requests_get_vllms_error_body(
    sim: Sim, path: str, raw: bytes, status: int, kind: str, param: str | None
) -> None:
    r = await sim.http.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == (kind, param, status)


async def test_prompt_too_long_is_reported_like_vllm(sim: Sim) -> None:
    r = await sim.http.post("/v1/completions", json={"prompt": "x " * 1100, "max_tokens": 2})
    assert r.json()["error"]["message"].startswith(
        "This model's maximum context length is 1024 tokens. However, your prompt contains "
        "at least 1025 input tokens"
    )


async def test_unknown_routes_and_methods_answer_like_starlette(sim: Sim) -> None:
    r = await sim.http.get("/nope")
    assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})
    r = await sim.http.get("/v1/completions")
    assert (r.status_code, r.json(), r.headers["allow"]) == (
        405,
        {"detail": "Method Not Allowed"},
        "POST",
    )


# -- metrics ------------------------------------------------------------------------------------


def _samples(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


async def test_metrics_count_like_vllm(sim: Sim) -> None:
    tokens = await sim.tokens(LONG_PROMPT)
    for _ in range(2):
        await sim.http.post("/v1/completions", json={"prompt": LONG_PROMPT, "max_tokens": 2})
    text = (await sim.http.get("/metrics")).text
    labels = f'{{engine="0",model_name="{MODEL}"}}'
    n = len(tokens)
    hits = (n - 1) // BLOCK * BLOCK
    assert _samples(text, "vllm:prefix_cache_queries_total") == {
        f"vllm:prefix_cache_queries_total{labels}": 2 * n
    }
    assert (
        _samples(text, "vllm:prefix_cache_hits_total")[f"vllm:prefix_cache_hits_total{labels}"]
        == hits
    )
    success = _samples(text, "vllm:request_success_total")
    assert (
        success[
            f'vllm:request_success_total{{engine="0",finished_reason="length",model_name="{MODEL}"}}'
        ]
        == 2
    )
    assert len(success) == 5
    assert (
        _samples(text, "vllm:time_to_first_token_seconds_count")[
            f"vllm:time_to_first_token_seconds_count{labels}"
        ]
        == 2
    )
    assert 'le="2560.0"' in text and "vllm:kv_cache_usage_perc" + labels + " 0.0" in text
    assert "vllm:num_requests_running" + labels + " 0.0" in text
    info = [line for line in text.splitlines() if line.startswith("vllm:cache_config_info{")]
    assert len(info) == 1 and 'block_size="32"' in info[0] and 'num_gpu_blocks="16384"' in info[0]


# -- KV events ----------------------------------------------------------------------------------


def _vllm_hashes(tokens: list[int], seed: str) -> list[int]:
    root, parent, out = none_hash(seed), None, []
    for i in range(len(tokens) // BLOCK):
        parent = hash_block(parent, tokens[i * BLOCK : (i + 1) * BLOCK], root)
        out.append(external_hash(parent))
    return out


async def test_kv_events_reach_a_real_sub_socket_as_vllm_publishes_them(sim: Sim) -> None:
    tokens = await sim.tokens(LONG_PROMPT)
    full = len(tokens) // BLOCK
    await sim.http.post("/v1/completions", json={"prompt": LONG_PROMPT, "max_tokens": 1})
    batch = await sim.batch()
    assert (batch.topic, batch.seq, batch.dp_rank) == ("kv", 0, 0)
    (event,) = batch.events
    assert event == BlockStored(
        block_hashes=tuple(_vllm_hashes(tokens, sim.server.cfg.hash_seed)),
        parent_block_hash=None,
        token_ids=tuple(tokens[: full * BLOCK]),
        block_size=BLOCK,
        lora_name=None,
        medium="GPU",
    )
    # Generated tokens that fill the next block are stored with the prompt's last block as parent.
    fill = (full + 1) * BLOCK - len(tokens) + 1
    await sim.http.post("/v1/completions", json={"prompt": LONG_PROMPT, "max_tokens": fill})
    follow = await sim.batch()
    assert follow.seq == 1 and len(tokens) % BLOCK  # the prompt's full blocks are all hit
    (generated,) = follow.events
    assert isinstance(generated, BlockStored)
    assert generated.parent_block_hash == event.block_hashes[-1]
    assert generated.token_ids[: len(tokens) - full * BLOCK] == tuple(tokens[full * BLOCK :])
    assert len(generated.token_ids) == BLOCK


async def test_sim_cache_lists_the_hashes_its_kv_events_published(sim: Sim) -> None:
    assert (await sim.http.get("/sim/cache")).json() == {"blocks": 0, "block_hashes": []}
    await sim.http.post("/v1/completions", json={"prompt": LONG_PROMPT, "max_tokens": 1})
    (event,) = (await sim.batch()).events
    assert isinstance(event, BlockStored)
    cache = (await sim.http.get("/sim/cache")).json()
    assert cache["block_hashes"] == sorted(f"{h:016x}" for h in event.block_hashes)
    assert cache["blocks"] == len(event.block_hashes)


async def test_replay_through_a_dealer(sim: Sim) -> None:
    await sim.http.post("/v1/completions", json={"prompt": LONG_PROMPT, "max_tokens": 1})
    live = await sim.batch()
    assert await sim.replay(0) == [live]
    assert await sim.replay(1) == []
    assert (await sim.http.get("/kv_event_sources")).json()["0"]["topic"] == "kv"


async def test_dropped_and_duplicated_batches(sim: Sim) -> None:
    await sim.http.post("/v1/completions", json={"prompt": "Warm up the stream " * 4})
    assert (await sim.batch()).seq == 0  # the subscription is live from here on
    assert (await sim.faults(kv_drop_fraction=1)).status_code == 200
    await sim.http.post("/v1/completions", json={"prompt": LONG_PROMPT, "max_tokens": 1})
    await sim.faults(kv_drop_fraction=0, kv_duplicate_fraction=1)
    await sim.http.post("/v1/completions", json={"prompt": "Another prompt " * 9, "max_tokens": 1})
    batches = []
    for _ in range(2):
        (frames,) = await recv_batch(sim.sub, max_messages=1)
        batches.append(decode_vllm_message(frames))
    assert [b.seq for b in batches] == [2, 2] and batches[0] == batches[1]  # 1 was dropped
    dropped = (await sim.replay(1))[0]
    assert dropped.seq == 1 and isinstance(dropped.events[0], BlockStored)


async def test_reset_prefix_cache_emits_all_blocks_cleared_with_the_next_step(sim: Sim) -> None:
    await sim.http.post("/v1/completions", json={"prompt": LONG_PROMPT, "max_tokens": 1})
    await sim.batch()
    assert (await sim.http.post("/reset_prefix_cache")).json() == {"success": True}
    await sim.http.post("/v1/completions", json={"prompt": LONG_PROMPT, "max_tokens": 1})
    batch = await sim.batch()
    assert batch.events[0] == AllBlocksCleared() and isinstance(batch.events[1], BlockStored)
    assert batch.events[1].parent_block_hash is None  # nothing was hit


# -- faults -------------------------------------------------------------------------------------


async def test_faults_endpoint_reads_validates_and_applies(sim: Sim) -> None:
    defaults = (await sim.http.get("/sim/faults")).json()
    assert defaults == {
        "crash": False,
        "hang": False,
        "slow_factor": 1.0,
        "fail_fraction": 0.0,
        "kv_drop_fraction": 0.0,
        "kv_duplicate_fraction": 0.0,
    }
    for bad in ({"fail_fraction": 2}, {"hang": "yes"}, {"explode": True}, [1]):
        r = await sim.http.post("/sim/faults", json=bad)
        assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"
    assert (await sim.http.get("/sim/faults")).json() == defaults
    r = await sim.faults(fail_fraction=1)
    assert r.json()["fail_fraction"] == 1.0
    failed = await sim.http.post("/v1/completions", json={"prompt": "x"})
    assert failed.status_code == 500
    assert failed.json()["error"]["type"] == "InternalServerError"
    assert failed.json()["error"]["code"] == 500


async def test_hang_stalls_requests_while_health_stays_ok(sim: Sim) -> None:
    await sim.faults(hang=True)
    engine = sim.server.engine
    results: list[httpx.Response] = []

    async def request() -> None:
        results.append(
            await sim.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request)
        while not engine.scheduler.waiting:
            await engine.wait_activity()
        assert (await sim.http.get("/health")).status_code == 200
        text = (await sim.http.get("/metrics")).text
        assert f'vllm:num_requests_waiting{{engine="0",model_name="{MODEL}"}} 1.0' in text
        assert engine.steps == 0 and not results
        await sim.faults(hang=False)
    assert results[0].status_code == 200


async def test_a_client_leaving_mid_stream_aborts_its_request(sim: Sim) -> None:
    await sim.faults(slow_factor=1000)  # one decode step takes a second
    engine = sim.server.engine
    body = {"model": MODEL, "prompt": "x", "max_tokens": 50, "stream": True}
    async with sim.http.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                break  # first token seen; leave
    while engine.scheduler.has_work:
        await engine.wait_activity()
    text = (await sim.http.get("/metrics")).text
    abort = f'vllm:request_success_total{{engine="0",finished_reason="abort",model_name="{MODEL}"}}'
    assert _samples(text, "vllm:request_success_total")[abort] == 1
    assert engine.scheduler.cache.usage == 0.0


# -- the process --------------------------------------------------------------------------------


async def _start(demo_model: Path, *extra: str) -> tuple[trio.Process, str]:
    argv = [
        sys.executable,
        "-m",
        "fleet.agent.sim",
        *_argv(demo_model, "tcp://127.0.0.1:1", *extra),
    ]
    proc = await trio.lowlevel.open_process(argv, stdout=-1)
    assert proc.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        chunk = await proc.stdout.receive_some(1)
        if not chunk:
            break
        line += chunk
    return proc, line.decode()


async def test_the_process_serves_then_crashes_on_demand(demo_model: Path) -> None:
    proc, line = await _start(demo_model)
    try:
        assert line.startswith(f"fleet-sim: serving {MODEL} at http://127.0.0.1:")
        url = line.split(" at ")[1].strip()
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get("/health")).status_code == 200
            with pytest.raises(httpx.HTTPError):
                await http.post("/sim/faults", json={"crash": True})
        assert await proc.wait() == 1
    finally:
        proc.kill()
        await proc.wait()


async def test_the_process_stops_cleanly_on_sigterm(demo_model: Path) -> None:
    proc, line = await _start(demo_model)
    try:
        assert "serving" in line
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0
    finally:
        proc.kill()
        await proc.wait()


@pytest.mark.parametrize(("extra", "status"), [(("--sim-fault", "crash"), 1), (("--sim-oops",), 2)])
async def test_the_process_exits_at_once(
    demo_model: Path, extra: tuple[str, ...], status: int
) -> None:
    proc, line = await _start(demo_model, *extra)
    assert line == "" and await proc.wait() == status


async def test_the_agents_supervisor_runs_and_restarts_a_sim(demo_model: Path) -> None:
    spec = EngineSpec(engine_id="sim-0", model=MODEL, model_path=str(demo_model), kind="sim")
    cfg = SupervisorConfig(
        health_interval_s=0.1, startup_poll_s=0.05, backoff_base_s=0.05, grace_s=2.0
    )
    async with httpx.AsyncClient() as client:
        sup = EngineSupervisor(
            spec, launch=LaunchConfig(), cfg=cfg, kv_endpoint="tcp://127.0.0.1:1", client=client
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            while sup.state != "ready":
                await sup.changed()
            first = sup.pid
            with pytest.raises(httpx.HTTPError):
                await client.post(sup.url + "/sim/faults", json={"crash": True})
            while not (sup.state == "ready" and sup.restarts == 1):
                await sup.changed()
            assert sup.pid != first and "exited with status 1" in sup.last_error
            nursery.cancel_scope.cancel()
        assert sup.state == "stopped"
