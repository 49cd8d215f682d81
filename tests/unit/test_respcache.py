"""The response cache's sans-I/O core (coordinator/respcache.py) and its answers in and out
(coordinator/respreplay.py): plain calls, no I/O."""

from __future__ import annotations

import json
import math

import pytest

from fleet.coordinator.respcache import (
    Answer,
    Backoff,
    LruCache,
    cache_key,
    deployment_identity,
    ineligible,
    normalize,
)
from fleet.coordinator.respreplay import (
    SSE_DONE,
    StreamTap,
    answer_from_body,
    render_body,
    render_stream,
)
from fleet.protocol.errors import ConfigError

CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}
ANSWER = Answer("chat", "Hello there", "stop", None, 7, 3, "vllm-0.32.0-x")


def test_streaming_user_and_model_do_not_change_the_key() -> None:
    streamed = {**CHAT, "model": "alias", "stream": True, "user": "ann",
                "stream_options": {"include_usage": True}}  # fmt: skip
    assert cache_key("chat", streamed, "d@1") == cache_key("chat", CHAT, "d@1")


def test_defaults_written_out_give_the_same_key() -> None:
    explicit = {**CHAT, "temperature": 0.0, "n": 1, "top_p": 1, "stop": None,
                "max_completion_tokens": 9}  # fmt: skip
    assert cache_key("chat", explicit, "d@1") == cache_key("chat", {**CHAT, "max_tokens": 9}, "d@1")
    prompt = {"model": "m", "prompt": "Hi", "temperature": 0}
    assert cache_key("completion", prompt, "d") == cache_key(
        "completion", {**prompt, "max_tokens": 16, "stop": []}, "d"
    )


def test_what_changes_the_answer_changes_the_key() -> None:
    base = cache_key("chat", CHAT, "d@1")
    assert cache_key("chat", CHAT, "d@2") != base  # another deployment version
    assert cache_key("completion", CHAT, "d@1") != base  # another endpoint
    assert cache_key("chat", {**CHAT, "max_tokens": 5}, "d@1") != base
    assert cache_key("chat", {**CHAT, "stop": "x"}, "d@1") != base
    assert cache_key("chat", {**CHAT, "cache_salt": "tenant-a"}, "d@1") != base
    other = {**CHAT, "messages": [{"role": "user", "content": "Hi!"}]}
    assert cache_key("chat", other, "d@1") != base


def test_normalize_leaves_the_body_alone_and_sorts_nothing_away() -> None:
    body = {**CHAT, "stop": "x", "top_p": 1}
    out = normalize("chat", body)
    assert body["stop"] == "x" and "model" in body
    assert out["stop"] == ["x"] and out["top_p"] == 1.0 and isinstance(out["top_p"], float)
    assert "model" not in out and out["n"] == 1 and out["add_generation_prompt"] is True


@pytest.mark.parametrize(
    ("body", "headers", "why"),
    [
        ({}, {}, "sampled"),  # the model's default temperature samples
        ({"temperature": 0.7}, {}, "sampled"),
        ({"temperature": 0.7, "seed": 3}, {}, None),
        ({"temperature": 0}, {}, None),
        ({"seed": 0}, {}, None),
        ({"temperature": 0, "n": 2}, {}, "n"),
        ({"temperature": 0, "best_of": 3}, {}, "n"),
        ({"temperature": 0, "logprobs": True}, {}, "logprobs"),
        ({"temperature": 0, "logprobs": 0}, {}, "logprobs"),
        ({"temperature": 0, "logprobs": False}, {}, None),
        ({"temperature": 0, "top_logprobs": 2}, {}, "top_logprobs"),
        ({"temperature": 0, "kv_transfer_params": {}}, {}, "kv_transfer_params"),
        ({"temperature": 0}, {"cache-control": "No-Store"}, "no_store"),
    ],
)
def test_only_deterministic_plain_answers_are_cacheable(
    body: dict[str, object], headers: dict[str, str], why: str | None
) -> None:
    assert ineligible("chat", body, headers) == why


def test_the_deployment_identity_names_it_and_changes_with_its_version() -> None:
    one = deployment_identity("chat", "v1", ("/m", "vllm", (), 1024))
    assert one.startswith("chat@")
    assert one == deployment_identity("chat", "v1", ("/m", "vllm", (), 1024))
    assert one != deployment_identity("chat", "v2", ("/m", "vllm", (), 1024))
    assert one != deployment_identity("chat", "v1", ("/m2", "vllm", (), 1024))


def test_an_answer_round_trips_and_foreign_values_are_refused() -> None:
    assert Answer.decode(ANSWER.encode()) == ANSWER
    for junk in (b"", b"[1]", b'{"text": 1}', b'{"kind": "chat"}'):
        with pytest.raises(ValueError):
            Answer.decode(junk)


def test_the_lru_drops_the_least_recently_used_past_its_count() -> None:
    lru = LruCache(max_entries=2, max_bytes=10_000)
    lru.put("a", b"1", now=0)
    lru.put("b", b"2", now=0)
    assert lru.get("a", now=1) == b"1"  # a is now the most recent
    lru.put("c", b"3", now=2)
    assert lru.get("b", now=3) is None and lru.get("a", now=3) == b"1" and len(lru) == 2


def test_the_lru_keeps_within_its_bytes_and_refuses_one_too_big() -> None:
    lru = LruCache(max_entries=100, max_bytes=10)
    assert lru.put("a", b"1234", now=0) and lru.put("b", b"1234", now=0)
    assert lru.bytes == 10
    assert lru.put("c", b"12", now=0)  # a goes
    assert lru.get("a", now=0) is None and lru.bytes == 8
    assert not lru.put("d", b"x" * 20, now=0)
    assert lru.put("b", b"1", now=0) and lru.bytes == 5  # replaced, counted once


def test_the_lru_expires_entries_after_their_ttl() -> None:
    lru = LruCache(max_entries=10, max_bytes=100, ttl_s=5)
    lru.put("a", b"1", now=10)
    assert lru.get("a", now=14.9) == b"1"
    assert lru.get("a", now=15) is None and len(lru) == 0 and lru.bytes == 0


@pytest.mark.parametrize(("entries", "size", "ttl"), [(0, 10, 1), (1, 0, 1), (1, 1, 0)])
def test_the_lru_refuses_bad_bounds(entries: int, size: int, ttl: float) -> None:
    with pytest.raises(ConfigError):
        LruCache(entries, size, ttl)


def test_backoff_doubles_to_its_cap_and_a_success_resets_it() -> None:
    b = Backoff(base_s=0.5, max_s=2.0)
    assert b.usable(0) and b.failed(now=0)  # the first failure is news
    assert not b.usable(0.4) and b.usable(0.5)
    assert not b.failed(now=0.5) and b.retry_at == 1.5  # 1 s
    b.failed(now=1.5)
    b.failed(now=3.5)
    assert b.pause_s == 2.0 and b.retry_at == 5.5  # capped
    assert b.ok() and not b.ok() and b.usable(0)
    b.failed(now=10)
    assert b.retry_at == 10.5  # back to the base


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_a_whole_answer_renders_as_vllm_and_reads_back(kind: str) -> None:
    answer = Answer(kind, "Hi", "length", None, 4, 2, "fp")
    raw = render_body(answer, model="m", request_id="fleet-1", created=5)
    body = json.loads(raw)
    assert body["id"] == ("chatcmpl-fleet-1" if kind == "chat" else "cmpl-fleet-1")
    assert body["object"] == ("chat.completion" if kind == "chat" else "text_completion")
    assert body["usage"]["total_tokens"] == 6 and body["created"] == 5 and body["model"] == "m"
    assert answer_from_body(kind, raw) == answer


def test_an_answer_with_tool_calls_or_several_choices_is_not_kept() -> None:
    body = json.loads(render_body(ANSWER, model="m", request_id="r", created=1))
    body["choices"][0]["message"]["tool_calls"] = [{"id": "t"}]
    assert answer_from_body("chat", json.dumps(body).encode()) is None
    body["choices"] = [body["choices"][0]] * 2
    assert answer_from_body("chat", json.dumps(body).encode()) is None
    assert answer_from_body("chat", b"not json") is None


def _events(data: list[bytes]) -> list[dict[str, object]]:
    return [json.loads(e[len(b"data: ") :]) for e in data if e != SSE_DONE]


def test_a_streamed_chat_replays_as_vllm_streams_it() -> None:
    events = render_stream(ANSWER, model="m", request_id="r", created=1, include_usage=True)
    assert events[-1] == SSE_DONE and all(e.endswith(b"\n\n") for e in events)
    chunks = _events(events)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}  # type: ignore[index]
    assert chunks[1]["choices"][0]["delta"] == {"content": "Hello there"}  # type: ignore[index]
    assert chunks[2]["choices"][0]["finish_reason"] == "stop"  # type: ignore[index]
    assert chunks[3]["choices"] == [] and chunks[3]["usage"]["completion_tokens"] == 3  # type: ignore[index]
    assert [("system_fingerprint" in c) for c in chunks] == [False, False, False, True]
    assert {c["id"] for c in chunks} == {"chatcmpl-r"}


def test_a_stream_without_usage_ends_with_its_finish_and_continuous_usage_is_on_every_chunk() -> (
    None
):  # fmt: skip
    answer = Answer("completion", "", "stop", "</s>", 4, 0)
    plain = _events(render_stream(answer, model="m", request_id="r", created=1,
                                  include_usage=False))  # fmt: skip
    assert len(plain) == 1 and plain[0]["choices"][0]["stop_reason"] == "</s>"  # type: ignore[index]
    each = _events(render_stream(ANSWER, model="m", request_id="r", created=1,
                                 include_usage=True, continuous_usage=True))  # fmt: skip
    assert all("usage" in c for c in each)


@pytest.mark.parametrize("cut", [1, 7, 1000])
def test_the_tap_reads_a_stream_back_whole_and_drops_a_usage_chunk_it_asked_for(cut: int) -> None:
    data = b"".join(render_stream(ANSWER, model="m", request_id="r", created=1,
                                  include_usage=True))  # fmt: skip
    tap = StreamTap("chat", drop_usage=True)
    kept: list[bytes] = []
    buffer = b""
    for i in range(0, len(data), cut):
        buffer += data[i : i + cut]
        *events, buffer = buffer.split(b"\n\n")
        kept += [e for e in events if tap.keep(e + b"\n\n")]
    assert tap.answer() == ANSWER
    assert not any(b'"choices":[]' in e for e in kept) and kept[-1] == b"data: [DONE]"


def test_the_tap_keeps_nothing_from_an_error_a_cut_or_usage_it_never_saw() -> None:
    events = render_stream(ANSWER, model="m", request_id="r", created=1, include_usage=True)
    cut = StreamTap("chat", drop_usage=False)
    for event in events[:-1]:
        assert cut.keep(event)
    assert cut.answer() is None  # no [DONE]
    failed = StreamTap("chat", drop_usage=False)
    for event in [events[0], b'data: {"error": {"message": "gone"}}\n\n', SSE_DONE]:
        failed.keep(event)
    assert failed.answer() is None
    no_usage = StreamTap("chat", drop_usage=False)
    for event in render_stream(ANSWER, model="m", request_id="r", created=1, include_usage=False):
        no_usage.keep(event)
    assert no_usage.answer() is None


def test_math_inf_ttl_means_never() -> None:
    lru = LruCache(1, 100)
    assert lru.ttl_s == math.inf
    lru.put("a", b"1", now=0)
    assert lru.get("a", now=1e12) == b"1"
