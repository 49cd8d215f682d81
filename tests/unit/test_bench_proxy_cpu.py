"""``python -m bench proxy-cpu`` at tiny scale: the stub engine, the load generators, the CPU
reading, and the whole run (a real coordinator, a real agent launching and registering the stub
over the agent link; Fleet only: vllm-router is installed by the benchmark, not by tests)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fleet.bench.cpuload import cpu_s, run_load

STUB = [sys.executable, "-m", "fleet.bench.stub_engine", "--served-model-name", "demo"]


@pytest.fixture
def stub() -> Iterator[tuple[str, int]]:
    """The stub engine on a free port (with flags it ignores, as the agent passes vLLM's);
    yields its URL and pid."""
    proc = subprocess.Popen(
        [*STUB, "--port", "0", "--dtype", "float32", "--enforce-eager"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "fleet-stub: serving demo at URL", once it listens
        yield line.rsplit(" ", 1)[1].strip(), proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_the_stub_answers_plain_streams_health_and_metrics(stub: tuple[str, int]) -> None:
    url, _ = stub
    assert httpx.get(url + "/health").status_code == 200
    body = {"model": "demo", "prompt": "x", "max_tokens": 5}
    plain = httpx.post(url + "/v1/completions", json=body).json()
    assert plain["choices"][0]["text"] == " tok" * 5 and plain["usage"]["completion_tokens"] == 5
    streamed = httpx.post(
        url + "/v1/completions",
        json=body | {"stream": True, "stream_options": {"include_usage": True}},
    )
    events = [ln[6:] for ln in streamed.text.splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) == 5 + 2  # tokens, usage, [DONE]
    assert json.loads(events[4])["choices"][0]["finish_reason"] == "length"
    assert json.loads(events[5])["usage"]["completion_tokens"] == 5
    assert 'vllm:num_requests_running{model_name="demo"} 0' in httpx.get(url + "/metrics").text
    assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "demo"
    assert httpx.get(url + "/tokenize").status_code == 404


@pytest.mark.parametrize(
    "generator",
    [
        "python",
        pytest.param(
            "wrk", marks=pytest.mark.skipif(not shutil.which("wrk"), reason="wrk not installed")
        ),
    ],
)
def test_the_load_checks_every_answer_and_the_stub_pays_the_cpu(
    stub: tuple[str, int], generator: str
) -> None:
    url, pid = stub
    before = cpu_s(pid)
    stream = json.dumps({"model": "demo", "prompt": "x", "max_tokens": 4, "stream": True})
    load = run_load(url + "/v1/completions", stream.encode(), stream=True, min_events=5,
                    connections=4, seconds=1, generator=generator)  # fmt: skip
    assert load.generator == generator
    assert load.sent > 0 and load.ok == load.sent and load.bad == 0
    assert cpu_s(pid) > before  # the stub process's CPU moved with the load
    # An answer that is not what was asked for (too few events) is counted bad.
    short = run_load(url + "/v1/completions", stream.encode(), stream=True, min_events=9,
                     connections=2, seconds=1, generator=generator)  # fmt: skip
    assert short.sent > 0 and short.ok == 0 and short.bad == short.sent


def test_cpu_s_counts_a_process_and_its_live_children() -> None:
    spin = "end = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    child = f"import time\n{spin}\nprint('spun', flush=True)\ntime.sleep(60)"
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys, time\n"
         f"subprocess.Popen([sys.executable, '-c', {child!r}])\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert parent.stdout is not None
        assert parent.stdout.readline() == "spun\n"  # the child has used its 0.3 s
        own = Path(f"/proc/{parent.pid}/stat").read_text().rsplit(")", 1)[1].split()
        assert (int(own[11]) + int(own[12])) / os.sysconf("SC_CLK_TCK") < 0.3  # it only slept
        assert cpu_s(parent.pid) >= 0.3
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()


def test_the_benchmark_runs_small(tmp_path: Path) -> None:
    from fleet.bench.cli import main

    main(
        ["proxy-cpu", "--targets", "fleet", "--seconds", "1", "--warmup-s", "0.5", "--idle-s",
         "0.5", "--tokens", "4", "--plain-concurrency", "2", "--stream-concurrency", "2,8",
         "--out", str(tmp_path)]
    )  # fmt: skip
    result = json.loads((tmp_path / "proxy_cpu" / "result.json").read_text())
    runs = {(r["mode"], r["concurrency"]): r for r in result["runs"]}
    assert set(runs) == {("plain", 2), ("stream", 2), ("stream", 8)}
    for run in runs.values():
        assert run["router"] == "fleet" and run["generator"] == "python"
        assert run["sent"] > 0 and run["ok"] == run["sent"], run
        assert run["cpu_ms_per_request"] > 0
    summary = result["summary"]["fleet"]
    assert summary["stream_ratio"] == pytest.approx(
        runs[("stream", 8)]["cpu_ms_per_request"] / runs[("stream", 2)]["cpu_ms_per_request"],
        abs=0.01,
    )
    assert set(summary["meets"]) == {"plain <= 0.5 ms", "stream@2 <= 1.0 ms", "ratio <= 1.5"}
    assert "| fleet | stream | 8 |" in (tmp_path / "proxy_cpu" / "result.md").read_text()
