"""``promtool check metrics`` on live scrapes of a coordinator and an agent (``fleet up`` with
two simulated engines on two fake GPUs), after traffic that creates the labelled series: plain
and streamed completions, a session, a priority, an unknown model, and an application XID.
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ..promtool import check_metrics, exposed_names
from .fleetproc import FleetProcess

MODEL = "demo"


@pytest.fixture(scope="module")
def fleet(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetProcess]:
    log_dir = tmp_path_factory.mktemp("metrics-scrape-logs")
    proc = FleetProcess(
        ["--engine", "sim", "--replicas", "2", "--model", str(demo_model), "--fake-gpus",
         "2x24GiB"],
        log_dir,
    )  # fmt: skip
    try:
        proc.wait_for(r"Fleet is serving `demo`", 300)
        yield proc
    finally:
        if proc.proc.poll() is None:
            proc.stop(signal.SIGTERM)


def _agent_url(fleet: FleetProcess) -> str:
    return fleet.wait_for(r"agent 'local' up \((\S+)\)", 30).group(1)


def _value(scrape: str, series: str) -> float:
    """The value of one exact series (name and labels as exposed) in a scrape."""
    match = re.search(rf"^{re.escape(series)} (\S+)$", scrape, re.M)
    assert match, f"{series} not in the scrape"
    return float(match.group(1))


def _ready(url: str) -> int:
    return sum(e["state"] == "ready" for e in httpx.get(url + "/api/v1/engines").json()["engines"])


def _traffic(url: str) -> None:
    prompt = "The fleet routes prompts to engines that hold their prefix. " * 8
    with httpx.Client(base_url=url, timeout=60) as http:
        for i in range(4):
            headers = {"x-session-id": "s1", "x-priority": "high" if i % 2 else "batch"}
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
            assert http.post("/v1/completions", json=body, headers=headers).status_code == 200
        stream = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                  "max_tokens": 2, "stream": True}  # fmt: skip
        with http.stream("POST", "/v1/chat/completions", json=stream) as r:
            assert r.status_code == 200
            r.read()
        missing = {"model": "no-such-model", "prompt": "x", "max_tokens": 1}
        assert http.post("/v1/completions", json=missing).status_code == 404


def test_live_scrapes_pass_promtool_and_hold_the_labelled_series(fleet: FleetProcess) -> None:
    agent = _agent_url(fleet)
    deadline = time.monotonic() + 60
    # "Fleet is serving" comes with the first ready engine, not the last
    while _ready(fleet.url) < 2:
        assert time.monotonic() < deadline, "two engines never became ready"
        time.sleep(0.2)
    _traffic(fleet.url)
    r = httpx.post(agent + "/api/v1/gpus/0/xid", json={"xid": 13})  # application XID: healthy
    assert r.status_code == 202

    coordinator = httpx.get(fleet.url + "/metrics", timeout=30).text
    assert check_metrics(coordinator) == ""
    assert _value(coordinator, 'fleet_requests_total{endpoint="/v1/completions",model="demo",'
                               'status="200"}') == 4  # fmt: skip
    assert _value(coordinator, 'fleet_requests_rejected_total{reason="model_not_found"}') == 1
    assert _value(coordinator, 'fleet_scheduler_decisions_total{outcome="picked"}') >= 5
    assert _value(coordinator, 'fleet_scheduler_session_affinity_total{outcome="hit"}') >= 1
    assert _value(coordinator, "fleet_scheduler_prompt_blocks_total") > 0
    assert _value(coordinator, 'fleet_deployment_ready_engines{deployment="demo"}') == 2
    assert _value(coordinator, 'fleet_queue_requests{model="demo",priority="high"}') == 0
    assert "fleet_upstream_first_byte_seconds_bucket{" in coordinator
    assert "fleet_scheduler_plugin_duration_seconds_count{" in coordinator

    deadline = time.monotonic() + 30
    while True:  # the XID reaches the monitor through the fake NVML's event wait
        scrape = httpx.get(agent + "/metrics", timeout=30).text
        if 'fleet_agent_gpu_xid_errors_total{gpu="0",xid="13"}' in scrape:
            break
        assert time.monotonic() < deadline, "the injected XID never showed"
        time.sleep(0.2)
    assert check_metrics(scrape) == ""
    assert _value(scrape, 'fleet_agent_gpu_healthy{gpu="0"}') == 1
    assert _value(scrape, 'fleet_agent_gpu_memory_total_bytes{gpu="1"}') == 24 * 2**30
    assert 'fleet_agent_engine_state{engine="demo-0",state="ready"} 1.0' in scrape
    names = exposed_names(scrape)
    for name in ("fleet_agent_gpu_temperature_celsius", "fleet_agent_gpu_utilization_ratio",
                 "fleet_agent_gpu_info", "fleet_agent_model_cache_bytes"):  # fmt: skip
        assert name in names
