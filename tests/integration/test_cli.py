"""The ``fleet`` CLI against one running ``fleet up --engine sim --replicas 2`` (four fake GPUs,
one per engine; its model store reads a loopback Hugging Face Hub mirror): output schemas,
formats, exit codes, contexts, ``--watch`` in a pseudo-terminal and on a pipe, ``agent
inspect``, ``deploy --wait``, ``models prestage --wait``; and ``fleet up``'s own output, status
lines on a pipe (that fleet's) and progress bars on a terminal (a second fleet)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

from fleet.agent.store.cachedir import cache_key
from fleet.modelscli import size

from ..unit.storeservers import HfMirror, model_files
from .clipty import ctrl_c_default, run_in_pty
from .clischemas import KV_STATS, NODE_INSPECT, SCHEMAS
from .fleetproc import FleetProcess, alive, children_tree

CLI_TIMEOUT_S = 60.0
HUB_REPO = "org/cli"
HUB_URI = f"hf://{HUB_REPO}"  # only test_prestage_wait_follows_the_download fetches it


@pytest.fixture(scope="module")
def hub() -> Iterator[HfMirror]:
    """A Hugging Face Hub mirror on loopback holding one small model, ``HUB_REPO``."""
    mirror = HfMirror()
    mirror.repos[HUB_REPO] = model_files(600_000)
    try:
        yield mirror
    finally:
        mirror.close()


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fleet's model cache (``--model-cache``)."""
    return tmp_path_factory.mktemp("cli-fleet-models")


@pytest.fixture(scope="module")
def fleet(
    demo_model: Path, hub: HfMirror, store_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FleetProcess]:
    log_dir = tmp_path_factory.mktemp("cli-fleet-logs")
    cache = tmp_path_factory.mktemp("cli-fleet-hub")
    args = ["--engine", "sim", "--replicas", "2", "--model", str(demo_model),
            "--fake-gpus", "4x80GiB@h100", "--gpus-per-engine", "1",
            "--model-cache", str(store_root), "--tokenizer-cache", str(cache / "tok"),
            "--hf-endpoint", hub.url]  # fmt: skip
    # shared/TEST-SERVERS.md: huggingface_hub calls nothing but the mirror
    hub_env = {"HF_HOME": str(cache / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1",
               "NO_PROXY": "127.0.0.1"}  # fmt: skip
    proc = FleetProcess(args, log_dir, hub_env)
    try:
        proc.wait_for(r"Fleet is serving `demo`", 300)
        proc.wait_ready(2, 120)
        yield proc
    finally:
        if proc.proc.poll() is None:
            proc.stop(signal.SIGTERM)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The CLI's environment: no coordinator, key or context from the test runner's."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("FLEET_", "NO_COLOR"))}
    return out | {"FLEET_CONFIG": str(tmp_path / "contexts.yaml")}


def fleet_cli(
    *args: str, env: Mapping[str, str], timeout_s: float = CLI_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleet", *args],
        capture_output=True,
        text=True,
        env=dict(env),
        timeout=timeout_s,
    )


def as_json(*args: str, env: Mapping[str, str]) -> Any:
    done = fleet_cli(*args, "-o", "json", env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("command", sorted(SCHEMAS))
def test_json_output_has_the_documented_shape(
    fleet: FleetProcess, env: dict[str, str], command: str
) -> None:
    data = as_json(command, "--coordinator", fleet.url, env=env)
    jsonschema.validate(data, SCHEMAS[command])
    if command == "engines":
        assert sorted(e["id"] for e in data["engines"]) == ["demo-0", "demo-1"]


def test_yaml_is_the_json_data_and_wide_adds_columns(
    fleet: FleetProcess, env: dict[str, str]
) -> None:
    as_yaml = fleet_cli("nodes", "--coordinator", fleet.url, "-o", "yaml", env=env)
    assert as_yaml.returncode == 0, as_yaml.stderr
    data = yaml.safe_load(as_yaml.stdout)
    assert [n["id"] for n in data["nodes"]] == ["local"]
    narrow = fleet_cli("engines", "--coordinator", fleet.url, env=env).stdout.splitlines()
    wide = fleet_cli("engines", "--coordinator", fleet.url, "-o", "wide", env=env).stdout
    header = wide.splitlines()[0].split()
    assert header[: len(narrow[0].split())] == narrow[0].split()
    assert {"KIND", "TIER", "GPUS", "ROUTABLE"} <= set(header)
    assert "\x1b[" not in wide  # a pipe gets no colour nor cursor codes
    assert re.search(r"demo-0 .* ready .* sim +h100 +\d", wide)


def test_node_inspect_shows_each_gpu_with_its_engines(
    fleet: FleetProcess, env: dict[str, str]
) -> None:
    data = as_json("node", "inspect", "local", "--coordinator", fleet.url, env=env)
    jsonschema.validate(data, NODE_INSPECT)
    gpus = data["node"]["gpus"]
    assert len(gpus) == 4 and all(g["fake"] and g["healthy"] for g in gpus)
    used = sorted(e for g in gpus for e in g["engines"])
    assert used == ["demo-0", "demo-1"]
    assert data["node"]["heartbeat_age_s"] < 30
    table = fleet_cli("node", "inspect", "local", "--coordinator", fleet.url, "-o", "wide",
                      env=env)  # fmt: skip
    assert table.returncode == 0
    assert "GPU-fake-" in table.stdout and "80.0 GiB" in table.stdout
    assert re.search(r"heartbeat [\d.]+ s ago", table.stdout)


def test_errors_are_one_line_with_trustworthy_exit_codes(
    fleet: FleetProcess, env: dict[str, str]
) -> None:
    missing = fleet_cli("node", "inspect", "nope", "--coordinator", fleet.url, env=env)
    assert missing.returncode == 1
    assert missing.stderr == "fleet: error: no node named nope (known: local)\n"
    down = fleet_cli("engines", "--coordinator", "http://127.0.0.1:9", env=env)
    assert down.returncode == 1 and down.stdout == ""
    assert down.stderr.startswith(
        "fleet: error: cannot reach the coordinator at http://127.0.0.1:9"
    )
    assert down.stderr.count("\n") == 1 and "Traceback" not in down.stderr
    not_fleet = fleet_cli("engines", "--coordinator", fleet.url + "/x", env=env)
    assert not_fleet.returncode == 1 and "/x/api/v1/engines: 404: " in not_fleet.stderr
    usage = fleet_cli("engines", "--no-such-flag", env=env)
    assert usage.returncode == 2
    bad_url = fleet_cli("engines", "--coordinator", "ftp://x", env=env)
    assert bad_url.returncode == 2 and "--coordinator" in bad_url.stderr


def test_contexts_env_and_flag_in_that_order_of_precedence(
    fleet: FleetProcess, env: dict[str, str], tmp_path: Path
) -> None:
    assert fleet_cli("config", "set-context", "here", "--coordinator", fleet.url,
                     env=env).returncode == 0  # fmt: skip
    assert fleet_cli("config", "set-context", "gone", "--coordinator", "http://127.0.0.1:9",
                     env=env).returncode == 0  # fmt: skip
    listed = as_json("config", "get-contexts", env=env)
    assert listed["current"] == "here"  # the first context made becomes current
    assert fleet_cli("engines", env=env).returncode == 0  # from the context
    assert fleet_cli("config", "use-context", "gone", env=env).returncode == 0
    assert fleet_cli("config", "current-context", env=env).stdout == "gone\n"
    assert fleet_cli("engines", env=env).returncode == 1  # the context's coordinator is down
    assert fleet_cli("engines", "--context", "here", env=env).returncode == 0
    with_env = env | {"FLEET_COORDINATOR": fleet.url}
    assert fleet_cli("engines", env=with_env).returncode == 0  # env beats the context
    flag = fleet_cli("engines", "--coordinator", "http://127.0.0.1:9", env=with_env)
    assert flag.returncode == 1 and "127.0.0.1:9" in flag.stderr  # the flag beats env
    unknown = fleet_cli("config", "use-context", "nope", env=env)
    assert unknown.returncode == 1 and "known: gone, here" in unknown.stderr
    assert yaml.safe_load(Path(env["FLEET_CONFIG"]).read_text())["current-context"] == "gone"


def test_watch_redraws_in_place_on_a_terminal_and_ctrl_c_exits_0(
    fleet: FleetProcess, env: dict[str, str]
) -> None:
    out, code = run_in_pty(
        [
            sys.executable,
            "-m",
            "fleet",
            "engines",
            "--watch",
            "--interval",
            "0.3",
            "--coordinator",
            fleet.url,
        ],  # fmt: skip
        env,
        until=lambda b: b.count(b"demo-1") >= 3,
        timeout_s=CLI_TIMEOUT_S,
    )
    assert code == 0
    assert out.count(b"demo-1") >= 3
    assert b"\x1b[1A" in out and b"\x1b[2K" in out  # cursor up, erase line: redrawn in place
    assert b"\x1b[32mready" in out  # green on a terminal
    plain, code = run_in_pty(
        [sys.executable, "-m", "fleet", "engines", "--coordinator", fleet.url],
        env | {"NO_COLOR": "1"},
        until=lambda b: b"demo-1" in b,
        timeout_s=CLI_TIMEOUT_S,
        interrupt=False,
    )
    assert code == 0 and b"demo-1" in plain and b"\x1b[32m" not in plain


def test_watch_on_a_pipe_prints_one_json_document_per_round(
    fleet: FleetProcess, env: dict[str, str]
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet", "nodes", "-o", "json", "--watch", "--interval", "0.2",
         "--coordinator", fleet.url],  # fmt: skip
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=ctrl_c_default,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        rounds = [json.loads(proc.stdout.readline()) for _ in range(3)]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=CLI_TIMEOUT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert all(r["nodes"][0]["id"] == "local" for r in rounds)


def test_agent_inspect_asks_the_agent_directly(fleet: FleetProcess, env: dict[str, str]) -> None:
    [node] = httpx.get(fleet.url + "/api/v1/nodes", timeout=30).json()["nodes"]
    data = as_json("agent", "inspect", "--agent", node["agent_url"], env=env)
    assert data["health"]["node"] == "local"
    assert len(data["gpus"]) == 4
    assert sorted(e["engine_id"] for e in data["engines"]) == ["demo-0", "demo-1"]
    assert [m["uri"] for m in data["models"]] in ([], [HUB_URI])  # served from a local path
    assert [f["uri"] for f in data["fetches"]] in ([], [HUB_URI])
    table = fleet_cli("agent", "inspect", env=env | {"FLEET_AGENT": node["agent_url"]})
    assert table.returncode == 0 and "demo-0" in table.stdout
    down = fleet_cli("agent", "inspect", "--agent", "http://127.0.0.1:9", env=env)
    assert down.returncode == 1 and "cannot reach the agent" in down.stderr


def test_kv_stats_after_traffic(fleet: FleetProcess, env: dict[str, str]) -> None:
    prompt = "the fleet routes prefixes well. " * 20
    for _ in range(2):
        body = {"model": "demo", "prompt": prompt, "max_tokens": 1}
        r = httpx.post(fleet.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200
    deadline = time.monotonic() + 30
    while True:
        data = as_json("kv", "stats", "--coordinator", fleet.url, env=env)
        if data["blocks"] or time.monotonic() > deadline:  # events arrive asynchronously
            break
        time.sleep(0.3)
    jsonschema.validate(data, KV_STATS)
    assert data["blocks"] > 0 and data["agentsUnreachable"] == []
    assert set(data["relay"]) == {"demo-0", "demo-1"}
    table = fleet_cli("kv", "stats", "--coordinator", fleet.url, env=env)
    assert table.returncode == 0 and re.search(r"KV index \d+ blocks", table.stdout)


def test_route_explain_in_every_format(fleet: FleetProcess, env: dict[str, str]) -> None:
    base = ("route", "explain", "--prompt", "hello fleet", "--coordinator", fleet.url)
    data = as_json(*base, env=env)
    assert {c["engine"] for c in data["candidates"]} == {"demo-0", "demo-1"}
    as_yaml = yaml.safe_load(fleet_cli(*base, "-o", "yaml", env=env).stdout)
    assert as_yaml["selected"] in ("demo-0", "demo-1")
    assert "◀" in fleet_cli(*base, env=env).stdout


def test_deploy_waits_until_ready(
    fleet: FleetProcess, env: dict[str, str], demo_model: Path, tmp_path: Path
) -> None:
    spec = tmp_path / "extra.yaml"
    spec.write_text(yaml.safe_dump({
        "apiVersion": "fleet.dev/v1alpha1", "kind": "FleetModel",
        "metadata": {"name": "extra"},
        "spec": {"servedModelNames": ["extra"], "source": str(demo_model), "replicas": 1},
    }))  # fmt: skip
    done = fleet_cli("deploy", "-f", str(spec), "--wait", "--timeout", "120",
                     "--coordinator", fleet.url, env=env, timeout_s=180)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "deployment extra created (desired 1)" in done.stdout
    assert "extra: 1/1 ready" in done.stdout  # off a terminal: a line per change
    [entry] = [d for d in as_json("deployments", "--coordinator", fleet.url, env=env)[
        "deployments"] if d["name"] == "extra"]  # fmt: skip
    assert entry["ready"] == 1
    again = fleet_cli("deploy", "-f", str(spec), "--coordinator", fleet.url, env=env)
    assert again.returncode == 0 and "deployment extra configured" in again.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: FleetModel\nspec: {}\n")
    refused = fleet_cli("deploy", "-f", str(bad), "--coordinator", fleet.url, env=env)
    assert refused.returncode == 2 and "metadata.name" in refused.stderr


def test_an_xid_shows_as_an_unhealthy_gpu(fleet: FleetProcess, env: dict[str, str]) -> None:
    [node] = httpx.get(fleet.url + "/api/v1/nodes", timeout=30).json()["nodes"]
    r = httpx.post(node["agent_url"] + "/api/v1/gpus/3/xid", json={"xid": 79}, timeout=30)
    assert r.status_code == 202
    deadline = time.monotonic() + 30
    while True:
        data = as_json("node", "inspect", "local", "--coordinator", fleet.url, env=env)
        gpu = data["node"]["gpus"][3]
        if not gpu["healthy"] or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert gpu["healthy"] is False and 79 in gpu["xids"]
    table = fleet_cli("node", "inspect", "local", "--coordinator", fleet.url, env=env).stdout
    assert re.search(r"\n3 \(fake\) .* 79 ", table)


def test_fleet_up_on_a_pipe_prints_plain_status_lines(fleet: FleetProcess) -> None:
    for engine in ("demo-0", "demo-1"):
        fleet.wait_for(rf"^• \[ *[\d.]+ s\] engine {engine}: ready \(pid \d+\)$", CLI_TIMEOUT_S)
    lines = list(fleet.lines)
    assert "✔ Fleet is serving `demo` at " + fleet.url + "/v1   (Ctrl-C to stop)" in lines
    assert not any("\x1b" in line for line in lines), lines  # no colour nor cursor codes
    assert not any("engines ready" in line for line in lines)  # the bars' text is not printed


def test_fleet_up_on_a_terminal_shows_bars_and_stops_every_process(
    demo_model: Path, env: dict[str, str], tmp_path: Path
) -> None:
    argv = [sys.executable, "-m", "fleet", "up", "--port", "0", "--log-dir", str(tmp_path),
            "--engine", "sim", "--replicas", "2", "--model", str(demo_model),
            "--fake-gpus", "2x80GiB@h100", "--gpus-per-engine", "1",
            "--model-cache", str(tmp_path / "models")]  # fmt: skip
    below: set[int] = set()
    out, code = run_in_pty(
        argv,
        env,
        until=lambda b: b"engines ready 2/2" in b and b"Fleet is serving `demo`" in b,
        timeout_s=120,
        before_interrupt=lambda pid: below.update(children_tree(pid)),
    )
    text = out.decode(errors="replace")
    assert code == 0, text[-2000:]
    assert below and not alive(below), f"left running: {sorted(alive(below))}"
    assert "engines ready 0/2" in text and "engines ready 2/2" in text
    assert "\x1b[?25l" in text and "\x1b[2K" in text  # cursor hidden, the bars redrawn in place
    assert "100%" in text[text.index("engines ready 2/2") :]
    assert re.search(r"engine demo-1: ready \(pid \d+\)\r\n", text)  # lines above the bars
    assert "stopped: every engine process has exited" in text


def test_prestage_wait_follows_the_download_until_cached(
    fleet: FleetProcess, hub: HfMirror, store_root: Path, env: dict[str, str], tmp_path: Path
) -> None:
    files = hub.repos[HUB_REPO]
    total = sum(len(data) for data in files.values())
    hub.faults.gate = threading.Event()  # file bodies wait until the download has been shown
    argv = [sys.executable, "-m", "fleet", "models", "prestage", HUB_URI, "--wait",
            "--timeout", str(CLI_TIMEOUT_S), "--coordinator", fleet.url]  # fmt: skip
    errors = tmp_path / "stderr"
    with errors.open("w") as stderr:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    lines: list[str] = []
    downloading = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("local: downloading "):
                downloading.set()

    reader = threading.Thread(target=read, name="prestage-output")
    reader.start()
    try:
        assert downloading.wait(CLI_TIMEOUT_S), "".join(lines) + errors.read_text()
        hub.faults.gate.set()
        code = proc.wait(timeout=CLI_TIMEOUT_S)
    finally:
        hub.faults.gate.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
    assert code == 0, "".join(lines) + errors.read_text()
    out = "".join(lines)
    assert lines[0] == f"prestaging {HUB_URI}\n"
    assert re.search(r"^local +(requested|fetching) ", out, re.M), out
    assert f"local: downloading 0 B/{size(total)}\n" in lines, out
    assert lines[-1] == f"local: cached, {size(total)}\n"
    assert "\x1b[" not in out and " \n" not in out  # a pipe: no codes, no trailing spaces

    [node] = as_json("nodes", "--coordinator", fleet.url, env=env)["nodes"]
    agent = as_json("agent", "inspect", "--agent", node["agent_url"], env=env)
    [model] = [m for m in agent["models"] if m["uri"] == HUB_URI]
    assert model["size_bytes"] == total and model["pinned"] is False  # no engine uses it
    assert agent["fetches"] == []
    folder = store_root / "entries" / cache_key(HUB_URI) / "model"
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
