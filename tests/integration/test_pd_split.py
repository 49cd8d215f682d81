"""Prefill/decode disaggregation over two real vLLM CPU engines, one of each role.

A FleetModel with ``spec.roles: {prefill: 1, decode: 1}`` and vLLM's ExampleConnector (KV handed
over through a shared folder; Fleet gives the prefill engine ``kv_producer`` and the decode engine
``kv_consumer``), behind a scheduler config that splits every request. Each answer names both
engines, and the decode engine's own ``vllm:external_prefix_cache_hits_total`` shows it loaded
the prompts the prefill engine computed instead of computing them again.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from .fleetproc import START_TIMEOUT_S, FleetProcess, alive

pytestmark = pytest.mark.engine

MODEL = "demo"
BLOCK = 32  # fleet up's default --block-size
SPLIT_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: decode-filter
- type: prefill-filter
- type: max-score-picker
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters:
    deciders:
      prefill: always-disagg-pd-decider
schedulingProfiles:
- name: decode
  plugins:
  - pluginRef: decode-filter
  - pluginRef: max-score-picker
- name: prefill
  plugins:
  - pluginRef: prefill-filter
  - pluginRef: max-score-picker
"""
TEXT = (
    "A split request is prefilled on one engine, which writes the prompt's KV blocks where the "
    "decode engine finds them, so that the decode engine only computes the answer. "
) * 4


@pytest.fixture(scope="module")
def fleet_pd(
    demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[httpx.Client, str]]:
    """``fleet up`` serving ``demo`` from one prefill and one decode engine; (client, the
    decode engine's URL)."""
    folder = tmp_path_factory.mktemp("pd-deployments")
    shared = tmp_path_factory.mktemp("pd-kv")
    connector = {
        "kv_connector": "ExampleConnector",  # no kv_role: Fleet sets it per engine role
        "kv_connector_extra_config": {"shared_storage_path": str(shared)},
    }
    doc = {
        "apiVersion": "fleet.dev/v1alpha1",
        "kind": "FleetModel",
        "metadata": {"name": "pd"},
        "spec": {
            "servedModelNames": [MODEL],
            "source": str(demo_model),
            "roles": {"prefill": 1, "decode": 1},
            "engineArgs": [f"--kv-transfer-config={json.dumps(connector)}"],
        },
    }
    (folder / "pd.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    config = tmp_path_factory.mktemp("pd-config") / "split.yaml"
    config.write_text(SPLIT_CONFIG)
    args = ["--deployments", str(folder), "--scheduler-config", str(config)]
    proc = FleetProcess([*args, "--engine-startup-timeout", "180"], tmp_path_factory.mktemp("logs"))
    pids: set[int] = set()
    try:
        proc.wait_for(r"Fleet is serving `demo`", START_TIMEOUT_S)
        proc.wait_ready(2, START_TIMEOUT_S)
        with httpx.Client(base_url=proc.url, timeout=120) as http:
            engines = http.get("/api/v1/engines").json()["engines"]
            roles = {e["id"]: e.get("role") for e in engines}
            assert roles == {"pd-prefill-0": "prefill", "pd-decode-0": "decode"}, engines
            yield http, next(e["url"] for e in engines if e["id"] == "pd-decode-0")
    finally:
        pids = proc.descendants()
        if proc.proc.poll() is None:
            proc.stop(signal.SIGTERM)  # SIGKILL would orphan vLLM's EngineCore processes
    assert not alive(pids), f"left running: {sorted(alive(pids))}"


def _counter(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)", text, re.M))


def _check_split(headers: httpx.Headers) -> None:
    assert headers["x-selected-pod"] == "pd-decode-0"
    assert headers["x-prefill-pod"] == "pd-prefill-0"


def test_split_requests_load_the_prompt_from_the_prefill_engine(
    fleet_pd: tuple[httpx.Client, str],
) -> None:
    http, decode_url = fleet_pd
    hits = "vllm:external_prefix_cache_hits_total"
    before = _counter(decode_url, hits)
    splits = _counter(str(http.base_url), r'fleet_pd_requests_total\{outcome="split"\}')
    prompt_tokens: list[int] = []
    for i in range(2):  # distinct prompts: nothing comes from the decode engine's own cache
        body: dict[str, Any] = {"model": MODEL, "prompt": f"{i}: {TEXT}", "max_tokens": 8}
        response = http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        _check_split(response.headers)
        answer = response.json()
        assert answer["choices"][0]["text"]
        prompt_tokens.append(answer["usage"]["prompt_tokens"])
    # streamed: the decode engine streams, the prefill engine was asked for one token
    stream = {"model": MODEL, "prompt": f"streamed: {TEXT}", "max_tokens": 8, "stream": True}
    stream["stream_options"] = {"include_usage": True}
    with http.stream("POST", "/v1/completions", json=stream) as response:
        assert response.status_code == 200, response.read()
        _check_split(response.headers)
        events = [
            json.loads(line[6:])
            for line in response.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"
        ]
    assert "".join(c["text"] for e in events for c in e["choices"])
    prompt_tokens.append(next(e["usage"] for e in events if e.get("usage"))["prompt_tokens"])
    assert min(prompt_tokens) > 4 * BLOCK
    after_splits = _counter(str(http.base_url), r'fleet_pd_requests_total\{outcome="split"\}')
    assert after_splits - splits == 3  # none fell back to decode only
    # ExampleConnector hands over whole blocks, never the prompt's last token: each prompt loads
    # at least all but its last block.
    loaded = _counter(decode_url, hits) - before
    assert sum(n - BLOCK for n in prompt_tokens) <= loaded <= sum(prompt_tokens), (
        loaded,
        prompt_tokens,
    )
