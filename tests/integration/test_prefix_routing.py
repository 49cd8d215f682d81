"""KV-cache-aware routing over two real vLLM CPU engines (``fleet up --replicas 2``).

After a long prompt was served by one engine, a request sharing that prefix goes to the same
engine, the response says how many prompt tokens it holds (``x-cache-prefix-length``), and the
engine's own ``vllm:prefix_cache_hits_total`` shows the hit. Done for a completion (the prompt
as text) and for chat (the prefix is a system prompt, through vLLM's chat template).
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from .fleetproc import FleetProcess, alive

pytestmark = pytest.mark.engine

MODEL = "demo"
BLOCK = 32
START_TIMEOUT_S = 420.0
SHARED = (
    "Fleet sends every request to the engine that already holds the longest prefix of its "
    "prompt in its KV cache, unless that engine is much busier than the others. "
) * 5


@pytest.fixture(scope="module")
def fleet2(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    log_dir = tmp_path_factory.mktemp("fleet-prefix-logs")
    # Two engines load at once on two cores: one that hangs while loading is restarted well
    # before the test gives up.
    args = ["--model", str(demo_model), "--replicas", "2", "--engine-startup-timeout", "180"]
    proc = FleetProcess(args, log_dir)
    try:
        proc.wait_for(r"Fleet is serving `demo`", START_TIMEOUT_S)
        proc.wait_ready(2, START_TIMEOUT_S)
        http = httpx.Client(base_url=proc.url, timeout=120)
        yield http
        http.close()
    finally:
        if proc.proc.poll() is None:
            proc.stop(signal.SIGTERM)  # SIGKILL would orphan vLLM's EngineCore processes


def _ready(http: httpx.Client) -> dict[str, dict[str, Any]]:
    engines = http.get("/api/v1/engines").json()["engines"]
    return {e["id"]: e for e in engines if e["state"] == "ready"}


def _hits(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(
        float(v) for v in re.findall(r"^vllm:prefix_cache_hits_total\{[^}]*\} (\S+)", text, re.M)
    )


def _indexed(http: httpx.Client, engine_id: str, at_least: int) -> None:
    """Wait until the coordinator's index holds ``at_least`` blocks of the engine."""
    deadline = time.monotonic() + 20
    while http.get(f"/api/v1/cache/pod/{engine_id}").json().get("blocks", 0) < at_least:
        assert time.monotonic() < deadline, "the engine's KV events never reached the index"
        time.sleep(0.2)


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_a_shared_prefix_goes_back_to_the_engine_that_holds_it(
    fleet2: httpx.Client, kind: str
) -> None:
    engines = _ready(fleet2)
    salt = f"{kind} {time.monotonic_ns()} "  # a prefix no engine holds yet

    def body(question: str) -> tuple[str, dict[str, Any]]:
        if kind == "chat":
            messages = [
                {"role": "system", "content": salt + SHARED},
                {"role": "user", "content": question},
            ]
            return "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 1}
        return "/v1/completions", {
            "model": MODEL,
            "prompt": salt + SHARED + question,
            "max_tokens": 1,
        }

    path, payload = body("What does Fleet do first?")
    first = fleet2.post(path, json=payload)
    assert first.status_code == 200, first.text
    holder = first.headers["x-selected-pod"]
    assert holder in engines and first.headers["x-cache-prefix-length"] == "0"
    _indexed(fleet2, holder, at_least=4)
    hits_before = {e: _hits(v["url"]) for e, v in engines.items()}

    path, payload = body("And what then?")
    second = fleet2.post(path, json=payload)
    assert second.status_code == 200, second.text
    assert second.headers["x-selected-pod"] == holder
    matched = int(second.headers["x-cache-prefix-length"])
    assert matched >= 4 * BLOCK and matched % BLOCK == 0
    assert float(second.headers["x-scheduling-time-ms"]) >= 0
    hits_after = {e: _hits(v["url"]) for e, v in engines.items()}
    # The engine itself saw the hit: at least the tokens Fleet said it holds.
    assert hits_after[holder] - hits_before[holder] >= matched
    other = next(e for e in engines if e != holder)
    assert hits_after[other] == hits_before[other]


# -- mid-stream resume (last: it kills an engine) -------------------------------------------------


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_a_stream_whose_engine_is_sigkilled_is_finished_by_the_other(
    fleet2: httpx.Client, kind: str
) -> None:
    """SIGKILL the real engine serving a stream after 5 chunks: the client's stream goes on
    (one id, one role, the full token budget, truthful usage) from the other engine."""
    # The first parametrization's victim restarts; until then the registry may still list it
    # ready for up to a heartbeat: wait for two ready engines whose processes are alive.
    deadline = time.monotonic() + START_TIMEOUT_S
    engines = {e: v for e, v in _ready(fleet2).items() if alive({v["pid"]})}
    while len(engines) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
        engines = {e: v for e, v in _ready(fleet2).items() if alive({v["pid"]})}
    assert len(engines) == 2
    # Long enough that the engine is still generating when it is killed after 5 chunks (with
    # 120, a slow reader in CI once got the whole answer first: there was nothing to resume).
    budget = 400
    client = openai.OpenAI(base_url=str(fleet2.base_url) + "/v1", api_key="none", max_retries=0)
    common: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": budget,
        "stream": True,
        "stream_options": {"include_usage": True},
        "extra_body": {"ignore_eos": True},
    }
    if kind == "chat":
        stream: Any = client.chat.completions.with_raw_response.create(
            messages=[{"role": "user", "content": "Write a long story."}], **common
        )
    else:
        stream = client.completions.with_raw_response.create(prompt="Once upon a time", **common)
    victim = stream.headers["x-selected-pod"]
    pieces, ids, roles, finishes, usage = [], set(), 0, [], None
    for i, chunk in enumerate(stream.parse()):
        ids.add(chunk.id)
        if i == 5:
            os.kill(engines[victim]["pid"], signal.SIGKILL)
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if kind == "chat":
                roles += choice.delta.role == "assistant"
                pieces.append(choice.delta.content or "")
            else:
                pieces.append(choice.text)
            if choice.finish_reason is not None:
                finishes.append(choice.finish_reason)
    assert len(ids) == 1 and finishes == ["length"] and (kind != "chat" or roles == 1)
    assert usage is not None and usage.completion_tokens == budget
    assert usage.total_tokens == usage.prompt_tokens + budget and usage.prompt_tokens > 0
    metrics = fleet2.get("/metrics").text
    assert re.search(r'^fleet_stream_resumes_total\{outcome="resumed"\} [1-9]', metrics, re.M)
