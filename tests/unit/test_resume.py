"""Mid-stream resume (fleet.coordinator.resume): the pieces, then the gateway continuing a stream
whose engine went silent on another real simulated engine."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from fleet.agent.sim.server import SimServer
from fleet.coordinator.proxy import Gateway
from fleet.coordinator.registry import FleetRegistry
from fleet.coordinator.resilience import ResilienceConfig
from fleet.coordinator.resume import (
    Progress,
    Rewriter,
    SseSplitter,
    continuation,
    why_not_resumable,
)
from fleet.coordinator.validation import validate
from fleet.protocol.messages import EngineStatus, Register

from .simgateway import sim_gateway, start_sim_server


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def test_events_are_cut_whole_whatever_the_byte_boundaries() -> None:
    stream = _event({"a": 1}) + b": comment\n\n" + _event({"b": 2}) + b"data: [DONE]\n\n"
    for cut in range(1, len(stream)):
        splitter = SseSplitter()
        events = splitter.feed(stream[:cut]) + splitter.feed(stream[cut:])
        assert b"".join(events) == stream and len(events) == 4


def test_a_completion_continues_with_the_generated_text_and_the_rest_of_the_budget() -> None:
    progress = Progress("completion")
    progress.absorb({"id": "cmpl-1", "created": 5, "model": "m", "choices": [{"text": " to"}]})
    progress.absorb({"id": "cmpl-1", "choices": [{"index": 0, "text": " be"}]})
    body = {"model": "m", "prompt": "Not", "max_tokens": 10, "min_tokens": 3, "stream": True}
    out = continuation("completion", body, progress, generated_tokens=2)
    assert isinstance(out, dict)
    assert out["prompt"] == "Not to be" and out["max_tokens"] == 8 and out["min_tokens"] == 1
    assert body["prompt"] == "Not"  # the client's request is not changed
    default = continuation("completion", {"prompt": "x"}, progress, 2)
    assert isinstance(default, dict) and default["max_tokens"] == 14  # vLLM's default 16 - 2
    assert continuation("completion", {"prompt": "x", "max_tokens": 2}, progress, 2) == (
        "budget spent"
    )


def test_a_chat_continues_the_partial_assistant_message() -> None:
    progress = Progress("chat")
    progress.absorb({"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
    progress.absorb({"id": "c", "choices": [{"index": 0, "delta": {"content": "Hel"}}]})
    progress.absorb({"id": "c", "choices": [{"index": 0, "delta": {"content": "lo"}}]})
    body = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 9}
    out = continuation("chat", body, progress, generated_tokens=2)
    assert isinstance(out, dict)
    assert out["messages"][-1] == {"role": "assistant", "content": "Hello"}
    assert out["continue_final_message"] is True and out["add_generation_prompt"] is False
    assert out["max_completion_tokens"] == 7 and len(body["messages"]) == 1
    prefilled = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Oh, "}],
        "continue_final_message": True,
        "add_generation_prompt": False,
    }
    out = continuation("chat", prefilled, progress, 2)
    assert isinstance(out, dict) and out["messages"][-1]["content"] == "Oh, Hello"
    assert prefilled["messages"][-1]["content"] == "Oh, "


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("completion", {"prompt": "x", "n": 2}),
        ("completion", {"prompt": "x", "echo": True}),
        ("completion", {"prompt": [1, 2, 3]}),
        ("completion", {"prompt": ["a", "b"]}),
        ("chat", {"messages": [], "response_format": {"type": "json_object"}}),
        ("chat", {"messages": [], "tools": [{"type": "function"}]}),
    ],
)
def test_what_cannot_be_continued_says_why(kind: str, body: dict[str, Any]) -> None:
    assert why_not_resumable(kind, body)
    assert isinstance(continuation(kind, body, Progress(kind), 0), str)


def test_the_continuation_is_rewritten_into_the_first_stream_with_truthful_usage() -> None:
    progress = Progress("chat")
    progress.absorb({"id": "first", "created": 1, "model": "m", "object": "chat.completion.chunk"})
    rewriter = Rewriter(progress, prompt_tokens=10, generated_tokens=4, include_usage=True)
    role = _event(
        {
            "id": "second",
            "created": 9,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
        }
    )
    assert rewriter.rewrite(role) is None  # the client had its role chunk already
    piece = rewriter.rewrite(
        _event({"id": "second", "created": 9, "choices": [{"index": 0, "delta": {"content": "x"}}]})
    )
    assert piece is not None
    chunk = json.loads(piece[6:])
    assert (
        chunk["id"] == "first"
        and chunk["created"] == 1
        and chunk["choices"][0]["delta"] == {"content": "x"}
    )
    # The continuing engine counted the original 10 prompt tokens plus 5 of generated text
    # (the text retokenized after the prompt): what was generated is the 4 the budget was cut
    # by, so a stream out of budget reports exactly max_tokens.
    usage = rewriter.rewrite(
        _event(
            {
                "id": "second",
                "choices": [],
                "usage": {"prompt_tokens": 15, "completion_tokens": 3, "total_tokens": 18},
            }
        )
    )
    assert usage is not None
    assert json.loads(usage[6:])["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 7,
        "total_tokens": 17,
    }
    quiet = Rewriter(progress, prompt_tokens=10, generated_tokens=4, include_usage=False)
    assert quiet.rewrite(_event({"choices": [], "usage": {"prompt_tokens": 15}})) is None
    assert rewriter.rewrite(b"data: [DONE]\n\n") == b"data: [DONE]\n\n"
    assert progress.text == "x"


# -- the gateway over real simulated engines ----------------------------------------------------


@dataclass
class Two:
    gateway: Gateway
    urls: dict[str, str]
    servers: dict[str, SimServer]


@pytest.fixture
async def two(demo_model: Path, nursery: trio.Nursery) -> AsyncIterator[Two]:
    slow = ("--sim-decode-ms-per-token", "20")  # a 30-token stream lasts 0.6 s
    servers, urls = {}, {}
    for name, seed in (("a", "1"), ("b", "2")):
        servers[name], urls[name] = await start_sim_server(
            demo_model, nursery, *slow, "--sim-seed", seed
        )
    gateway, pools = sim_gateway(urls, demo_model, ResilienceConfig(stream_idle_s=0.5))
    yield Two(gateway, urls, servers)
    await pools.aclose()
    nursery.cancel_scope.cancel()


async def _stream_with_hang(two: Two, kind: str, body: dict[str, Any]) -> tuple[str, list[Any]]:
    """Stream ``body``; after 3 events hang the engine serving it. Returns the pod and the
    decoded data events the client got."""
    raw = json.dumps(body).encode()
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    forwarded = await two.gateway.forward(path, validate(kind, raw), raw, {})
    pod = forwarded.headers["x-selected-pod"]
    splitter = SseSplitter()
    events: list[Any] = []
    async for chunk in forwarded.body:
        for event in splitter.feed(chunk):
            assert event.startswith(b"data: ")
            data = event[6:].strip()
            events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
            if len(events) == 3:
                # At once, in this process: a hang sent over HTTP let the engine go on making
                # tokens meanwhile, and a slow enough request on a busy machine let it finish.
                engine = two.servers[pod].engine
                engine.set_faults(engine.faults.updated({"hang": True}))
    return pod, events


@pytest.mark.parametrize("kind", ["completion", "chat"])
async def test_a_stream_whose_engine_hangs_is_finished_by_the_other_engine(
    two: Two, kind: str
) -> None:
    body: dict[str, Any] = {"model": "demo", "max_tokens": 30, "stream": True, "ignore_eos": True}
    body["stream_options"] = {"include_usage": True}
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": "Tell me a long story."}]
    else:
        body["prompt"] = "Once upon a time"
    pod, events = await _stream_with_hang(two, kind, body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1  # one stream for the client
    assert len({c["created"] for c in chunks}) == 1
    pieces = [c["choices"][0] for c in chunks if c["choices"]]
    if kind == "chat":
        assert [p["delta"].get("role") for p in pieces].count("assistant") == 1
    finishes = [p["finish_reason"] for p in pieces if p["finish_reason"] is not None]
    assert finishes == ["length"]
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 30  # the budget held across both engines
    prompt = await two.gateway.tokenizer.tokens("demo", kind, body)
    assert prompt is not None and usage["prompt_tokens"] == len(prompt)
    assert usage["total_tokens"] == usage["prompt_tokens"] + 30
    gateway = two.gateway
    assert gateway.metrics.stream_resumes.labels(outcome="resumed")._value.get() == 1
    assert gateway.breakers.get(pod).consecutive == 1  # the silent engine counts a failure
    assert gateway.inflight.get("a") == gateway.inflight.get("b") == 0


async def test_with_no_engine_left_the_stream_ends_with_an_error_event(two: Two) -> None:
    two.gateway.registry = FleetRegistry(lost_after_s=60)
    registry = two.gateway.registry
    only = EngineStatus(engine_id="a", model="demo", url=two.urls["a"], state="ready")
    registry.register(Register("n2", "", "test", (), (only,)), trio.current_time())
    body = {"model": "demo", "prompt": "Hi", "max_tokens": 30, "stream": True, "ignore_eos": True}
    _, events = await _stream_with_hang(two, "completion", body)
    assert events[-1] == "[DONE]" and "error" in events[-2]
    assert events[-2]["error"]["code"] == 503
    assert two.gateway.metrics.stream_resumes.labels(outcome="no_engine")._value.get() == 1
