"""The prefill/decode split (fleet.coordinator.pdsplit): the decisions by plain calls, then the
whole protocol through the gateway over simulated engines speaking NixlConnector's
``kv_transfer_params`` round trip (a prefill engine, two decode engines)."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from fleet.agent.sim.server import SimServer
from fleet.coordinator import tracing
from fleet.coordinator.pdsplit import (
    PREFILL_PARAMS,
    DecodeCall,
    PDConfig,
    PrefillAnswer,
    after_prefill,
    decode_body,
    plan_prefill,
    prefill_body,
)
from fleet.coordinator.prefiller import Forbidden
from fleet.coordinator.proxy import Gateway
from fleet.coordinator.registry import EngineView
from fleet.coordinator.resilience import ResilienceConfig
from fleet.coordinator.validation import validate
from fleet.protocol.errors import ConfigError
from fleet.protocol.kvevents import BlockStored

from .simgateway import sim_gateway, start_sim_server


def view(engine_id: str, role: str = "decode") -> EngineView:
    return EngineView(engine_id, "n1", "demo", f"http://127.0.0.1:1/{engine_id}", 1, "ready",
                      role, "sim", 0, 32, (), True)  # fmt: skip


P, D = view("p", "prefill"), view("d")
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "stream_options": {"include_usage": True}, "max_tokens": 50}  # fmt: skip


# -- the decisions, by plain calls -------------------------------------------------------------


def test_the_prefill_request_asks_for_a_remote_decode_of_one_token() -> None:
    sent = json.loads(prefill_body(CHAT))
    assert sent["kv_transfer_params"] == PREFILL_PARAMS
    assert sent["kv_transfer_params"]["do_remote_decode"] is True
    assert sent["stream"] is False and "stream_options" not in sent
    assert sent["max_tokens"] == sent["max_completion_tokens"] == 1
    assert sent["messages"] == CHAT["messages"]
    completion = json.loads(prefill_body({"model": "demo", "prompt": "x", "max_tokens": 9}))
    assert completion["max_tokens"] == 1 and "max_completion_tokens" not in completion


def test_the_decode_request_is_the_original_with_the_prefills_params_verbatim() -> None:
    params = {"do_remote_prefill": True, "remote_block_ids": [[1, 2]], "remote_port": 5600}
    sent = json.loads(decode_body(CHAT, params))
    assert sent == {**CHAT, "kv_transfer_params": params}  # stream and its options kept


def test_the_prefill_gets_a_share_of_the_time_left_capped() -> None:
    cfg = PDConfig(prefill_share=0.25, prefill_timeout_s=3)
    call = plan_prefill("/v1/completions", CHAT, P, D, now=100, deadline=108, cfg=cfg)
    assert call is not None and call.engine is P and call.deadline == 102  # 0.25 × 8 s
    capped = plan_prefill("/v1/completions", CHAT, P, D, 100, float("inf"), cfg)
    assert capped is not None and capped.deadline == 103  # no deadline: the cap
    assert plan_prefill("/x", CHAT, None, D, 100, 108, cfg) is None  # not split
    assert plan_prefill("/x", CHAT, D, D, 100, 108, cfg) is None  # never prefill for itself
    assert plan_prefill("/x", CHAT, P, D, 108, 108, cfg) is None  # no time left
    for bad in ({"prefill_share": 0}, {"prefill_share": 1.5}, {"prefill_timeout_s": 0}):
        with pytest.raises(ConfigError):
            PDConfig(**bad)  # type: ignore[arg-type]


def test_after_the_prefill_the_decode_gets_its_params_or_falls_back() -> None:
    raw = json.dumps(CHAT).encode()
    call = plan_prefill("/v1/chat/completions", CHAT, P, D, 0, 10, PDConfig())
    params = {"do_remote_prefill": True, "remote_engine_id": "e"}
    ok = PrefillAnswer(200, json.dumps({"kv_transfer_params": params}).encode())
    split = after_prefill(call, ok, CHAT, raw)
    assert split.outcome == "split" and split.prefill is P
    assert json.loads(split.body)["kv_transfer_params"] == params
    # ExampleConnector answers null: the prefill ran, the original goes to decode
    null = after_prefill(call, PrefillAnswer(200, b'{"kv_transfer_params": null}'), CHAT, raw)
    assert (null.outcome, null.body, null.prefill) == ("split", raw, P)
    cases = {
        "refused": PrefillAnswer(failure="refused"),
        "timeout": PrefillAnswer(failure="timeout"),
        "status": PrefillAnswer(503, b"{}"),
        "bad_answer": PrefillAnswer(200, b"not json"),
    }
    for reason, answer in cases.items():
        assert after_prefill(call, answer, CHAT, raw) == DecodeCall(raw, "fallback", reason)
    assert after_prefill(None, PrefillAnswer(), CHAT, raw) == DecodeCall(raw, "decode_only")


# -- the protocol over simulated engines -------------------------------------------------------

NIXL = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both"})
PD_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefill-filter
- type: decode-filter
- type: active-request-scorer
- type: max-score-picker
- type: prefix-based-pd-decider
  parameters: {nonCachedTokens: 64}
- type: disagg-profile-handler
  parameters: {deciders: {prefill: prefix-based-pd-decider}}
schedulingProfiles:
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: active-request-scorer},
            {pluginRef: max-score-picker}]
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: active-request-scorer},
            {pluginRef: max-score-picker}]
"""
LONG = " ".join(f"word{i}" for i in range(150))  # well over 64 tokens
FAST = ("--sim-decode-ms-per-token", "0.5", "--kv-transfer-config", NIXL)


@dataclass
class Fleet:
    gateway: Gateway
    urls: dict[str, str]
    prefill_scope: trio.CancelScope
    prefill_server: SimServer


@pytest.fixture
async def fleet(demo_model: Path, nursery: trio.Nursery) -> AsyncIterator[Fleet]:
    scope = trio.CancelScope()

    async def prefill_engine(task_status: trio.TaskStatus[tuple[SimServer, str]]) -> None:
        with scope:
            async with trio.open_nursery() as inner:
                # slow prefill: a split is in flight long enough to kill its engine mid-way
                slow = ("--sim-prefill-ms-per-token", "2")
                task_status.started(await start_sim_server(demo_model, inner, *FAST, *slow))

    server, prefill_url = await nursery.start(prefill_engine)
    urls = {
        "p": prefill_url,
        "d0": (await start_sim_server(demo_model, nursery, *FAST))[1],
        "d1": (await start_sim_server(demo_model, nursery, *FAST))[1],
    }
    roles = {"p": "prefill", "d0": "decode", "d1": "decode"}
    gateway, pools = sim_gateway(
        urls,
        demo_model,
        ResilienceConfig(base_backoff_s=0.001),
        roles=roles,
        config=PD_CONFIG,
        pd=PDConfig(prefill_timeout_s=5),
    )
    yield Fleet(gateway, urls, scope, server)
    await pools.aclose()
    nursery.cancel_scope.cancel()


async def ask(
    gateway: Gateway, prompt: str, *, stream: bool = False, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    body = {"model": "demo", "prompt": prompt, "max_tokens": 4, "temperature": 0}
    if stream:
        body["stream"] = True
    raw = json.dumps(body).encode()
    parsed = validate("completion", raw)
    forwarded = await gateway.forward("/v1/completions", parsed, raw, headers or {})
    return forwarded.status, forwarded.headers, b"".join([c async for c in forwarded.body])


async def external_hits(url: str) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(url + "/metrics")).text
    found = re.search(r"^vllm:external_prefix_cache_hits_total\{[^}]*\} (\S+)$", text, re.M)
    assert found is not None
    return float(found.group(1))


def outcomes(gateway: Gateway) -> dict[str, float]:
    counter = gateway.metrics.pd_requests
    return {o: counter.labels(outcome=o)._value.get() for o in ("split", "fallback", "decode_only")}


async def test_a_long_prompt_is_prefilled_on_the_prefill_engine_and_decoded_elsewhere(
    fleet: Fleet,
) -> None:
    gateway = fleet.gateway
    status, headers, body = await ask(gateway, LONG)
    assert status == 200
    decode = headers["x-selected-pod"]
    assert headers["x-prefill-pod"] == "p" and decode in ("d0", "d1")
    answer = json.loads(body)
    assert answer["kv_transfer_params"] is None  # the decode engine's answer, as vLLM's
    prompt_tokens = answer["usage"]["prompt_tokens"]
    # the decode engine loaded every prompt token it did not compute (the last one it did)
    assert await external_hits(fleet.urls[decode]) == prompt_tokens
    # the same answer the decode engine gives computing the prompt itself
    async with httpx.AsyncClient() as http:
        direct = await http.post(
            fleet.urls[decode] + "/v1/completions",
            json={"model": "demo", "prompt": LONG, "max_tokens": 4, "temperature": 0},
        )
    assert direct.json()["choices"][0]["text"] == answer["choices"][0]["text"]
    # streamed: the decode engine streams; both engines named
    status, headers, body = await ask(gateway, LONG + " again", stream=True)
    assert status == 200 and headers["x-prefill-pod"] == "p"
    assert body.endswith(b"data: [DONE]\n\n")
    assert outcomes(gateway) == {"split": 2, "fallback": 0, "decode_only": 0}
    assert gateway.inflight.get("p") == 0


async def test_short_and_cached_prompts_are_not_split(fleet: Fleet) -> None:
    gateway = fleet.gateway
    status, headers, _ = await ask(gateway, "hello there")
    assert status == 200 and "x-prefill-pod" not in headers
    # the long prompt cached on both decode engines (the KV index says so): not split either
    raw = json.dumps({"model": "demo", "prompt": LONG, "max_tokens": 4}).encode()
    tokens = await gateway.tokenizer.tokens("demo", "completion", validate("completion", raw).body)
    assert tokens is not None and len(tokens) > 64
    full = len(tokens) // 32 * 32
    for engine in ("d0", "d1"):
        stored = BlockStored(
            block_hashes=tuple(range(1, full // 32 + 1)),
            parent_block_hash=None,
            token_ids=tuple(tokens[:full]),
            block_size=32,
            medium="GPU",
        )
        gateway.scheduler.index.apply(engine, "demo", 0, [stored])
    status, headers, _ = await ask(gateway, LONG)
    assert status == 200 and "x-prefill-pod" not in headers
    assert outcomes(gateway) == {"split": 0, "fallback": 0, "decode_only": 2}


async def test_a_prefill_engine_killed_mid_split_falls_back_and_every_request_is_answered(
    fleet: Fleet,
) -> None:
    gateway = fleet.gateway
    results: list[tuple[int, dict[str, str], bytes]] = []

    async def one(i: int) -> None:
        results.append(await ask(gateway, f"{LONG} number {i}", stream=i % 2 == 0))

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(one, i)
        engine = fleet.prefill_server.engine
        with trio.fail_after(10):
            while len(engine.scheduler.running) + len(engine.scheduler.waiting) < 4:
                await engine.wait_activity()  # until every prefill is on the prefill engine
        fleet.prefill_scope.cancel()  # the prefill engine dies mid-prefill
    # later requests find it gone: refused, then ejected (decode only, no wait)
    for i in range(3):
        results.append(await ask(gateway, f"{LONG} later {i}"))
    assert [status for status, _, _ in results] == [200] * 7
    assert all("x-prefill-pod" not in headers for _, headers, _ in results)
    assert all(body.strip() for _, _, body in results)
    counts = outcomes(gateway)
    assert counts["split"] == 0 and counts["fallback"] >= 5
    assert counts["fallback"] + counts["decode_only"] == 7
    assert gateway.breakers.get("p").state == "open"
    assert gateway.inflight.get("p") == 0


async def test_the_prefiller_header_naming_the_prefill_engine_splits_even_a_short_prompt(
    fleet: Fleet,
) -> None:
    gateway = fleet.gateway
    named = {"x-prefiller-host-port": fleet.urls["p"].removeprefix("http://")}
    status, headers, _ = await ask(gateway, "hello there", headers=named)
    assert status == 200 and headers["x-prefill-pod"] == "p"
    decode = {"x-prefiller-host-port": fleet.urls["d0"].removeprefix("http://")}
    with pytest.raises(Forbidden):  # a decode engine is no prefill engine
        await ask(gateway, "hello there", headers=decode)
    assert gateway.metrics.ssrf_blocked.labels(reason="not_prefill")._value.get() == 1
    assert outcomes(gateway) == {"split": 1, "fallback": 0, "decode_only": 0}


async def test_a_split_request_traces_its_prefill_within_its_attempt(fleet: Fleet) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        status, headers, _ = await ask(fleet.gateway, LONG)
    finally:
        tracing.install(None)
    assert status == 200 and headers["x-prefill-pod"] == "p"
    by_name = {s.name: s for s in exporter.get_finished_spans()}
    schedule, attempt = by_name["fleet.schedule"], by_name["fleet.attempt"]
    prefill, call = by_name["fleet.prefill"], by_name["fleet.engine_call"]
    assert schedule.attributes is not None and schedule.attributes["fleet.pd.split"] is True
    assert schedule.attributes["fleet.prefill.engine.id"] == "p"
    assert prefill.parent is not None and call.parent is not None
    assert prefill.parent.span_id == call.parent.span_id == attempt.context.span_id
    assert dict(prefill.attributes or {}) == {
        "fleet.engine.id": "p",
        "fleet.pd.outcome": "split",
        "fleet.pd.reason": "",
    }
