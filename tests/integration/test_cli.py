"""The ``fleet`` CLI against one running ``fleet up --engine sim --replicas 2`` (four fake GPUs,
one per engine): output schemas, formats, exit codes, contexts, ``--watch`` in a
pseudo-terminal and on a pipe, ``agent inspect``, ``deploy --wait``."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

from .clipty import run_in_pty
from .fleetproc import FleetProcess

CLI_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def fleet(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetProcess]:
    log_dir = tmp_path_factory.mktemp("cli-fleet-logs")
    args = ["--engine", "sim", "--replicas", "2", "--model", str(demo_model),
            "--fake-gpus", "4x80GiB@h100", "--gpus-per-engine", "1"]  # fmt: skip
    proc = FleetProcess(args, log_dir)
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


GPU = {
    "type": "object",
    "required": [
        "index",
        "uuid",
        "name",
        "memory_total_bytes",
        "memory_used_bytes",
        "utilization_pct",
        "temperature_c",
        "power_w",
        "ecc_uncorrected",
        "healthy",
        "xids",
        "reason",
        "fake",
    ],  # fmt: skip
    "properties": {
        "index": {"type": "integer"},
        "xids": {"type": "array"},
        "healthy": {"type": "boolean"},
    },  # fmt: skip
}
ENGINE = {
    "type": "object",
    "required": [
        "id",
        "node",
        "model",
        "url",
        "pid",
        "state",
        "role",
        "kind",
        "restarts",
        "gpus",
        "routable",
    ],  # fmt: skip
}
NODE = {
    "type": "object",
    "required": [
        "id",
        "agent_url",
        "agent_version",
        "healthy",
        "lost",
        "gpus",
        "engines",
        "models",
        "fetches",
        "heartbeat_age_s",
    ],  # fmt: skip
    "properties": {
        "gpus": {"type": "array", "items": GPU},
        "heartbeat_age_s": {"type": "number", "minimum": 0},
    },  # fmt: skip
}
SCHEMAS = {
    "engines": {"type": "object", "required": ["engines"],
                "properties": {"engines": {"type": "array", "items": ENGINE}}},
    "nodes": {"type": "object", "required": ["nodes"],
              "properties": {"nodes": {"type": "array", "items": NODE}}},
    "deployments": {"type": "object", "required": ["deployments"], "properties": {
        "deployments": {"type": "array", "items": {"type": "object", "required": [
            "name", "servedModelNames", "desired", "placed", "ready", "engines", "reasons"]}}}},
    "models": {"type": "object", "required": ["models"]},
}  # fmt: skip
NODE_INSPECT = {
    "type": "object",
    "required": ["node", "engines"],
    "properties": {
        "node": {"allOf": [NODE, {"properties": {"gpus": {"type": "array", "items": {
            "required": ["engines"]}}}}]},
        "engines": {"type": "array", "items": ENGINE},
    },
}  # fmt: skip
KV_STATS = {
    "type": "object",
    "required": ["blocks", "entries", "max_entries", "engines", "stats", "relay",
                 "agentsUnreachable"],  # fmt: skip
    "properties": {
        "engines": {"type": "array", "items": {"type": "object", "required": [
            "engine_id", "model", "blocks", "events", "batches"]}},
        "relay": {"type": "object", "additionalProperties": {"type": "object", "required": [
            "gaps", "replays", "replayedBatches", "resyncs"]}},
    },
}  # fmt: skip


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
    assert data["models"] == [] and data["fetches"] == []
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
