"""``fleet up --engine sim``: 64 simulated engines, each its own process, behind one coordinator.

The simulator speaks vLLM's API and KV-event stream (tests/integration/test_sim_equivalence.py
proves it against a real engine), so this is the whole Fleet path at scale on one machine.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import trio

from fleet.coordinator.kvindex import block_keys

from .fleetproc import FleetProcess, alive

REPLICAS = 64
MODEL = "demo"
BLOCK = 32


@pytest.fixture(scope="module")
def sim_fleet(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetProcess]:
    log_dir = tmp_path_factory.mktemp("sim-fleet-logs")
    proc = FleetProcess(
        ["--engine", "sim", "--replicas", str(REPLICAS), "--model", str(demo_model)], log_dir
    )
    try:
        proc.wait_for(r"Fleet is serving `demo`", 300)
        yield proc
    finally:
        if proc.proc.poll() is None:
            proc.stop(signal.SIGTERM)  # SIGKILL would orphan vLLM's EngineCore processes


def test_all_engines_become_ready_and_serve_the_openai_client(sim_fleet: FleetProcess) -> None:
    deadline = time.monotonic() + 120
    while True:
        engines = httpx.get(sim_fleet.url + "/api/v1/engines").json()["engines"]
        ready = [e for e in engines if e["state"] == "ready"]
        if len(ready) == REPLICAS or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(ready) == REPLICAS
    assert len({e["pid"] for e in ready}) == REPLICAS  # one process each
    client = openai.OpenAI(base_url=sim_fleet.url + "/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    completion = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4)
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_kv_events_flow_from_many_engines_into_the_index(sim_fleet: FleetProcess) -> None:
    prompts = [f"Conversation {i}: " + "the fleet routes prefixes well. " * 20 for i in range(160)]
    selected: dict[str, list[str]] = {}

    async def send_all() -> None:
        async with httpx.AsyncClient(base_url=sim_fleet.url, timeout=60) as http:

            async def one(prompt: str) -> None:
                r = await http.post(
                    "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1}
                )
                assert r.status_code == 200, r.text
                selected.setdefault(r.headers["x-selected-pod"], []).append(prompt)

            async with trio.open_nursery() as nursery:
                for prompt in prompts:
                    nursery.start_soon(one, prompt)

    trio.run(send_all)
    assert len(selected) >= REPLICAS // 2  # traffic spread over the fleet
    engines = {e["id"]: e for e in httpx.get(sim_fleet.url + "/api/v1/engines").json()["engines"]}
    wanted: dict[str, set[str]] = {}
    for engine_id, sent in selected.items():
        url = engines[engine_id]["url"]
        for prompt in sent:
            tokens = httpx.post(url + "/tokenize", json={"model": MODEL, "prompt": prompt}).json()
            keys = block_keys(MODEL, tokens["tokens"], BLOCK)
            assert len(keys) >= 5
            wanted.setdefault(engine_id, set()).update(f"{k:016x}" for k in keys)
    deadline = time.monotonic() + 20
    missing = dict(wanted)
    while missing and time.monotonic() < deadline:
        for engine_id in list(missing):
            pod = httpx.get(f"{sim_fleet.url}/api/v1/cache/pod/{engine_id}").json()
            if missing[engine_id] <= set(pod.get("block_keys", [])):
                del missing[engine_id]
        time.sleep(0.2)
    assert not missing, f"blocks never indexed for {sorted(missing)}"


def test_route_explain_and_score_see_the_engine_holding_a_prompt(
    sim_fleet: FleetProcess, tmp_path: Path
) -> None:
    """After a prompt was served, ``/api/v1/score`` and ``fleet route explain`` show its engine
    holding the prompt's blocks; the next request with that prefix goes there."""
    prompt = "Explain routing to me, please. " * 12 + str(time.monotonic_ns())
    first = httpx.post(
        sim_fleet.url + "/v1/completions",
        json={"model": MODEL, "prompt": prompt, "max_tokens": 1},
        timeout=60,
    )
    holder = first.headers["x-selected-pod"]
    deadline = time.monotonic() + 20
    while True:
        scored = httpx.post(
            sim_fleet.url + "/api/v1/score", json={"model": MODEL, "prompt": prompt}, timeout=30
        ).json()
        best = max(scored["engines"], key=lambda e: e["blocks_present"])
        if best["blocks_present"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert best["engine_id"] == holder and best["blocks_present"] >= 3
    assert best["blocks_present"] == best["blocks_total"] and best["score"] == 1.0
    assert len(scored["engines"]) == REPLICAS

    from fleet.cli import main

    out = tmp_path / "explain.json"
    with open(out, "w") as f, contextlib.redirect_stdout(f), pytest.raises(SystemExit) as done:
        main(["route", "explain", "--prompt", prompt, "--coordinator", sim_fleet.url,
              "-o", "json"])  # fmt: skip
    assert done.value.code == 0
    explained = json.loads(out.read_text())
    assert explained["selected"] == holder and explained["prefix_tokens"] >= 3 * BLOCK
    by_engine = {c["engine"]: c for c in explained["candidates"]}
    assert by_engine[holder]["scores"]["precise-prefix-cache-scorer"]["score"] == 1.0
    assert len(by_engine) == REPLICAS
    second = httpx.post(
        sim_fleet.url + "/v1/completions",
        json={"model": MODEL, "prompt": prompt + " More.", "max_tokens": 1},
        timeout=60,
    )
    assert second.headers["x-selected-pod"] == holder
    assert int(second.headers["x-cache-prefix-length"]) >= 3 * BLOCK
    bad = httpx.post(sim_fleet.url + "/api/v1/route/explain", json={"model": MODEL}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
    missing = httpx.post(
        sim_fleet.url + "/api/v1/score", json={"model": "nope", "prompt": "x"}, timeout=30
    )
    assert missing.status_code == 404


def test_sigterm_stops_all_simulated_engines(sim_fleet: FleetProcess) -> None:
    pids = sim_fleet.descendants()
    assert len(pids) >= REPLICAS
    assert sim_fleet.stop(signal.SIGTERM, timeout_s=60) == 0
    assert not alive(pids)
