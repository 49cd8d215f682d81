"""Autoscaling on simulated engines (``fleet up --deployments DIR --engine sim``): a deployment
with ``minReplicas: 0``/``maxReplicas: 3`` starts with no engine, is scaled from zero by its
first request, up by a burst of streams, down under streaming load without a failed or broken
stream, and back to zero when idle.

The autoscaler runs with short windows here (target 2 requests per engine, a 6 s stable window,
zero after 4 s idle) and the simulators decode at 20 ms a token, so a 200-token stream lasts
about 4 s: longer than the 1 s drain an engine scaled down gets before its streams are resumed
elsewhere."""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from .fleetproc import FleetProcess, alive

pytestmark = pytest.mark.engine

NAME = "auto"
TOKENS = 200
TIMEOUT_S = 60.0


def _doc(model: Path, high: int) -> dict[str, Any]:
    return {
        "apiVersion": "fleet.dev/v1alpha1",
        "kind": "FleetModel",
        "metadata": {"name": NAME},
        "spec": {"servedModelNames": [NAME], "source": str(model), "minReplicas": 0,
                 "maxReplicas": high},
    }  # fmt: skip


def _write(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(path)


@pytest.fixture(scope="module")
def fleet(
    demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[FleetProcess, Path]]:
    folder = tmp_path_factory.mktemp("deployments")
    _write(folder / "auto.yaml", _doc(demo_model, 3))
    args = ["--engine", "sim", "--deployments", str(folder), "--autoscale-target", "2",
            "--autoscale-window", "6", "--scale-to-zero-after", "4",
            "--engine-drain-timeout", "1", "--engine-arg=--sim-decode-ms-per-token=20"]  # fmt: skip
    proc = FleetProcess(args, tmp_path_factory.mktemp("logs"))
    pids: set[int] = set()
    try:
        yield proc, folder
    finally:
        pids = proc.descendants()
        if proc.proc.poll() is None:
            proc.stop(signal.SIGTERM)
    assert not alive(pids), f"left running: {sorted(alive(pids))}"


def _status(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/admin/v1/deployments/{NAME}", timeout=30).json()  # type: ignore[no-any-return]


def _until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not predicate():
        assert time.monotonic() < deadline, f"not within {TIMEOUT_S} s: {what}"
        time.sleep(0.1)


def _inflight(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    found = re.findall(r'^fleet_requests_inflight\{engine="([^"]+)"\} (\S+)', text, re.M)
    return {engine: float(value) for engine, value in found}


def _resumed(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    found = re.search(r'^fleet_stream_resumes_total\{outcome="resumed"\} (\S+)', text, re.M)
    return float(found.group(1)) if found else 0.0


class Streams:
    """``count`` clients, each streaming one request after another until stopped; every
    stream's serving engine and whether it ended whole (finish "length", all its tokens)."""

    def __init__(self, url: str, count: int) -> None:
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        self.stop = threading.Event()
        self.results: list[tuple[str, str]] = []  # (engine, "ok" or what went wrong)
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(count)]
        for t in self.threads:
            t.start()

    def _run(self, index: int) -> None:
        while not self.stop.is_set():
            engine, verdict = "", "ok"
            try:
                raw = self.client.completions.with_raw_response.create(
                    model=NAME, prompt=f"client {index} asks", max_tokens=TOKENS, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
                )  # fmt: skip
                engine = raw.headers.get("x-selected-pod", "")
                finish, usage = None, None
                for chunk in raw.parse():
                    usage = chunk.usage or usage
                    for choice in chunk.choices:
                        finish = choice.finish_reason or finish
                if finish != "length" or usage is None or usage.completion_tokens != TOKENS:
                    verdict = f"finish {finish}, usage {usage}"
            except openai.APIError as exc:
                verdict = f"{type(exc).__name__}: {exc}"
            self.results.append((engine, verdict))

    def join(self) -> list[tuple[str, str]]:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=TIMEOUT_S)
        return self.results


def test_the_first_request_scales_the_deployment_from_zero(
    fleet: tuple[FleetProcess, Path],
) -> None:
    proc, _ = fleet
    assert (_status(proc.url)["desired"], _status(proc.url)["ready"]) == (0, 0)
    client = openai.OpenAI(base_url=proc.url + "/v1", api_key="none", max_retries=0)
    start = time.monotonic()
    stream = client.completions.create(model=NAME, prompt="Hello", max_tokens=4, stream=True)
    first = next(iter(stream))
    took = time.monotonic() - start
    assert first.choices and first.id
    list(stream)
    print(f"\ntime to first token from zero engines (simulator): {took:.2f} s")
    assert _status(proc.url)["ready"] == 1


def test_a_burst_scales_up_and_scaling_down_under_load_breaks_no_stream(
    fleet: tuple[FleetProcess, Path], demo_model: Path
) -> None:
    proc, folder = fleet
    burst = Streams(proc.url, 12)  # 12 in flight / 2 per engine: the most, 3
    try:
        _until(lambda: _status(proc.url)["ready"] == 3, "scaled up to 3 ready engines")
        busy = (f"{NAME}-1", f"{NAME}-2")
        _until(lambda: all(_inflight(proc.url).get(e, 0) > 0 for e in busy),
               "streams in flight on the engines about to be scaled down")  # fmt: skip
        resumed = _resumed(proc.url)
        _write(folder / "auto.yaml", _doc(demo_model, 1))  # 3 -> 1 while 12 streams run
        _until(lambda: _status(proc.url)["desired"] == 1, "scaled down to 1")
        time.sleep(TOKENS * 0.02 + 2.0)  # the drain (1 s) and every stream it cut, resumed
    finally:
        results = burst.join()
    bad = [r for r in results if r[1] != "ok"]
    on_removed = [r for r in results if r[0] in (f"{NAME}-1", f"{NAME}-2")]
    print(f"\n{len(results)} streams, {len(on_removed)} on the engines scaled down, "
          f"{_resumed(proc.url) - resumed:.0f} resumed")  # fmt: skip
    assert bad == [] and len(results) >= 12
    assert on_removed  # the scale-down did meet streams in flight
    _until(lambda: _status(proc.url)["ready"] == 1, "the two engines scaled down are gone")


def test_an_idle_deployment_scales_to_zero(fleet: tuple[FleetProcess, Path]) -> None:
    proc, _ = fleet
    _until(lambda: _status(proc.url)["desired"] == 0, "desired 0 after 4 s idle")
    _until(
        lambda: httpx.get(proc.url + "/api/v1/engines", timeout=30).json()["engines"] == [],
        "no engine left",
    )
    assert _status(proc.url)["ready"] == 0
