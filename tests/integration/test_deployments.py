"""Declared deployments behind ``fleet up --engine sim --deployments DIR``.

Two files: ``alpha`` (the demo model under its own name) and ``chat`` in two versions weighted
90/10. Requests route by served name and version (sticky per ``x-session-id``); edits of the
folder (scale up, new weights, a file deleted) and the admin API (create, replace, delete) are
reflected while the fleet runs. Session ids are fixed strings, so which version each one gets
is fixed too (a hash), not a sample.
"""

from __future__ import annotations

import collections
import fnmatch
import functools
import hashlib
import http.server
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from fleet.protocol.vllm_tokenizer import TOKENIZER_FILES, VllmTokenizer

from .fleetproc import FleetProcess, alive

SETTLE_TIMEOUT_S = 60.0  # a safety bound: the figures printed are what these tests measure
SESSIONS = [f"session-{i}" for i in range(300)]


def _doc(name: str, served: str, model: Path, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "fleet.dev/v1alpha1",
        "kind": "FleetModel",
        "metadata": {"name": name},
        "spec": {"servedModelNames": [served], "source": str(model), **spec},
    }


def _write(path: Path, *docs: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    tmp.replace(path)  # the watcher never reads half a file


def _chat(model: Path, v1: dict[str, Any], v2: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        _doc("chat-v1", "chat", model, version="v1", **v1),
        _doc("chat-v2", "chat", model, version="v2", **v2),
    ]


@pytest.fixture(scope="module")
def fleet(
    demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[httpx.Client, Path]]:
    folder = tmp_path_factory.mktemp("deployments")
    _write(folder / "alpha.yaml", _doc("alpha", "alpha", demo_model, replicas=1))
    _write(
        folder / "chat.yaml",
        *_chat(demo_model, {"trafficWeight": 90, "replicas": 1}, {"trafficWeight": 10}),
    )
    cache = tmp_path_factory.mktemp("model-cache")
    proc = FleetProcess(
        ["--engine", "sim", "--deployments", str(folder), "--model-cache", str(cache)],
        tmp_path_factory.mktemp("logs"),
    )
    pids: set[int] = set()
    try:
        proc.wait_for(r"Fleet is serving `alpha`", 120)
        proc.wait_for(r"Fleet is serving `chat`", 120)
        with httpx.Client(base_url=proc.url, timeout=30) as http:
            # "serving `chat`" means one version is up; the split needs both (and alpha)
            _until(lambda: _all_ready(http, ["alpha", "chat-v1", "chat-v2"]), "all ready")
            yield http, folder
    finally:
        pids = proc.descendants()
        if proc.proc.poll() is None:
            proc.stop(signal.SIGTERM)
    assert not alive(pids), f"left running: {sorted(alive(pids))}"


def _until(predicate: Callable[[], bool], what: str) -> float:
    """Poll the fleet's API until ``predicate`` holds; the seconds it took."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < SETTLE_TIMEOUT_S, f"not within {SETTLE_TIMEOUT_S}: {what}"
        time.sleep(0.1)
    took = time.monotonic() - start
    print(f"{what}: {took:.2f} s")
    return took


def _status(http: httpx.Client, name: str) -> dict[str, Any]:
    response = http.get(f"/admin/v1/deployments/{name}")
    return response.json() if response.status_code == 200 else {"ready": -1, "desired": -1}


def _all_ready(http: httpx.Client, names: list[str]) -> bool:
    statuses = [_status(http, n) for n in names]
    return all(s["ready"] == s["desired"] >= 1 for s in statuses)


def _models(http: httpx.Client) -> set[str]:
    return {m["id"] for m in http.get("/v1/models").json()["data"]}


def _versions(http: httpx.Client, sessions: list[str]) -> collections.Counter[str]:
    """Which deployment served each session's request (engine ids are NAME-i)."""
    seen: collections.Counter[str] = collections.Counter()
    for session in sessions:
        response = http.post(
            "/v1/completions",
            json={"model": "chat", "prompt": "Hello", "max_tokens": 2},
            headers={"x-session-id": session},
        )
        assert response.status_code == 200, response.text
        seen[response.headers["x-selected-pod"].rsplit("-", 1)[0]] += 1
    return seen


def test_requests_route_by_served_name_and_version_weight(
    fleet: tuple[httpx.Client, Path],
) -> None:
    http, _ = fleet
    assert _models(http) == {"alpha", "chat"}
    split = _versions(http, SESSIONS)
    assert set(split) == {"chat-v1", "chat-v2"}
    assert 0.06 <= split["chat-v2"] / len(SESSIONS) <= 0.14  # 10% of new sessions
    sticky = _versions(http, ["one-session"] * 5)
    assert len(sticky) == 1  # a session stays on its version
    alpha = http.post("/v1/completions", json={"model": "alpha", "prompt": "Hi", "max_tokens": 2})
    assert alpha.status_code == 200 and alpha.headers["x-selected-pod"].startswith("alpha-")
    listing = http.get("/admin/v1/deployments").json()
    assert {d["name"]: (d["desired"], d["ready"]) for d in listing["deployments"]} == {
        "alpha": (1, 1),
        "chat-v1": (1, 1),
        "chat-v2": (1, 1),
    }
    assert listing["folderError"] == ""


def test_folder_edits_scale_reweigh_and_delete(
    fleet: tuple[httpx.Client, Path], demo_model: Path
) -> None:
    http, folder = fleet
    _write(
        folder / "chat.yaml",
        *_chat(demo_model, {"trafficWeight": 50, "replicas": 2}, {"trafficWeight": 50}),
    )
    _until(lambda: _status(http, "chat-v1")["ready"] == 2, "scaled up chat-v1 to 2 ready")
    split = _versions(http, SESSIONS)
    assert 0.4 <= split["chat-v2"] / len(SESSIONS) <= 0.6  # now half
    (folder / "alpha.yaml").unlink()
    _until(lambda: "alpha" not in _models(http), "alpha deleted: gone from /v1/models")
    _until(
        lambda: not any(e["id"].startswith("alpha-") for e in _engines(http)),
        "alpha's engine stopped",
    )
    gone = http.post("/v1/completions", json={"model": "alpha", "prompt": "Hi", "max_tokens": 2})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    # A broken file is not applied: the fleet keeps what it runs and says why.
    (folder / "broken.yaml").write_text("apiVersion: fleet.dev/v1alpha1\nkind: FleetModel\n")
    _until(lambda: bool(http.get("/admin/v1/deployments").json()["folderError"]), "error shown")
    assert "broken.yaml" in http.get("/admin/v1/deployments").json()["folderError"]
    assert _status(http, "chat-v1")["ready"] == 2
    (folder / "broken.yaml").unlink()
    _until(lambda: not http.get("/admin/v1/deployments").json()["folderError"], "error cleared")


def _engines(http: httpx.Client) -> list[dict[str, Any]]:
    engines: list[dict[str, Any]] = http.get("/api/v1/engines").json()["engines"]
    return engines


def test_the_admin_api_creates_replaces_and_deletes(
    fleet: tuple[httpx.Client, Path], demo_model: Path
) -> None:
    http, folder = fleet
    beta = _doc("beta", "beta", demo_model, replicas=1)
    created = http.post("/admin/v1/deployments", json=beta)
    assert created.status_code == 201, created.text
    assert (folder / "beta.yaml").exists()  # the folder stays the one truth
    _until(lambda: "beta" in _models(http), "beta created: served")
    again = http.post("/admin/v1/deployments", json=beta)
    assert again.status_code == 409 and again.json()["error"]["code"] == "exists"
    beta["spec"]["replicas"] = 2
    replaced = http.put("/admin/v1/deployments/beta", json=beta)
    assert replaced.status_code == 200, replaced.text
    _until(lambda: _status(http, "beta")["ready"] == 2, "beta replaced: 2 ready")
    wrong = http.put("/admin/v1/deployments/other", json=beta)
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "metadata.name"
    bad = http.put(
        "/admin/v1/deployments/beta", json={**beta, "spec": {**beta["spec"], "replicas": -1}}
    )
    assert bad.status_code == 400 and "spec.replicas" in bad.json()["error"]["message"]
    assert http.delete("/admin/v1/deployments/chat-v1").status_code == 409  # chat.yaml's
    assert http.delete("/admin/v1/deployments/beta").status_code == 200
    assert not (folder / "beta.yaml").exists()
    _until(lambda: "beta" not in _models(http), "beta deleted: not served")
    assert http.get("/admin/v1/deployments/beta").status_code == 404
    assert http.delete("/admin/v1/deployments/beta").status_code == 404


@pytest.fixture(scope="module")
def model_server(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The demo model over plain HTTP with a fleet-manifest.json (docs/MODELSTORE.md): its URL."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(demo_model, root / "demo")
    files = [
        {"path": p.name, "size": p.stat().st_size,
         "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted((root / "demo").iterdir())
    ]  # fmt: skip
    (root / "demo" / "fleet-manifest.json").write_text(json.dumps({"files": files}))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/demo/"
    finally:
        server.shutdown()
        thread.join(timeout=10)


def test_a_deployment_from_an_http_source_is_fetched_by_the_agent(
    fleet: tuple[httpx.Client, Path], model_server: str
) -> None:
    http, _ = fleet
    remote = {
        "apiVersion": "fleet.dev/v1alpha1",
        "kind": "FleetModel",
        "metadata": {"name": "remote"},
        "spec": {"servedModelNames": ["remote"], "source": model_server, "replicas": 1},
    }
    assert http.post("/admin/v1/deployments", json=remote).status_code == 201
    _until(lambda: "remote" in _models(http), "http source fetched, engine ready")
    answer = http.post("/v1/completions", json={"model": "remote", "prompt": "Hi", "max_tokens": 2})
    assert answer.status_code == 200 and answer.headers["x-selected-pod"] == "remote-0"
    assert _status(http, "remote")["source"] == model_server
    assert http.delete("/admin/v1/deployments/remote").status_code == 200
    _until(lambda: "remote" not in _models(http), "remote deleted")


def test_a_remote_model_routes_by_prefix_once_the_coordinator_has_its_tokenizer(
    fleet: tuple[httpx.Client, Path], model_server: str, demo_model: Path
) -> None:
    http, _ = fleet
    name = "remote-prefix"
    doc = {
        "apiVersion": "fleet.dev/v1alpha1",
        "kind": "FleetModel",
        "metadata": {"name": name},
        "spec": {"servedModelNames": [name], "source": model_server, "replicas": 1},
    }
    assert http.post("/admin/v1/deployments", json=doc).status_code == 201
    _until(lambda: name in _models(http), "http source fetched, engine ready")
    prompt = " ".join(f"word{i} of a long shared prefix" for i in range(40))
    expected = len(VllmTokenizer(demo_model).encode(prompt, add_special_tokens=True))

    def tokenized() -> int | None:
        answer = http.post("/api/v1/route/explain", json={"model": name, "prompt": prompt})
        assert answer.status_code == 200, answer.text
        return answer.json()["prompt_tokens"]  # None: routed without prefix matching

    _until(lambda: tokenized() is not None, "the coordinator has the tokenizer")
    assert tokenized() == expected  # the prompt tokenized exactly as the engine will
    metrics = http.get("/metrics").text
    assert f'fleet_tokenizer_ready{{source="{model_server}"}} 1.0' in metrics
    first = http.post("/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": 1})
    assert first.status_code == 200 and first.headers["x-cache-prefix-length"] == "0"

    def indexed() -> int:
        scored = http.post("/api/v1/score", json={"model": name, "prompt": prompt}).json()
        return max(e["blocks_present"] for e in scored["engines"])

    _until(lambda: indexed() >= 3, "the engine's KV events indexed")
    second = http.post(
        "/v1/completions", json={"model": name, "prompt": prompt + " More.", "max_tokens": 1}
    )
    assert second.status_code == 200
    assert int(second.headers["x-cache-prefix-length"]) >= 3 * 32  # prefix matching works
    assert http.delete(f"/admin/v1/deployments/{name}").status_code == 200
    _until(lambda: name not in _models(http), f"{name} deleted")


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files and counts the GETs of each path (the test asks what was downloaded)."""

    gets: collections.Counter[str]

    def do_GET(self) -> None:
        self.gets[self.path] += 1
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def counted_server(
    demo_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, collections.Counter[str]]]:
    """The demo model over HTTP at a URI no other test fetches, and the GETs it served."""
    root = tmp_path_factory.mktemp("served-counted")
    shutil.copytree(demo_model, root / "warm")
    files = [
        {"path": p.name, "size": p.stat().st_size}
        for p in sorted((root / "warm").iterdir())
    ]  # fmt: skip
    (root / "warm" / "fleet-manifest.json").write_text(json.dumps({"files": files}))
    gets: collections.Counter[str] = collections.Counter()
    handler_cls = type("Handler", (_CountingHandler,), {"gets": gets})
    handler = functools.partial(handler_cls, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/warm/", gets
    finally:
        server.shutdown()
        thread.join(timeout=10)


def _prestage_states(http: httpx.Client, source: str) -> list[str]:
    for entry in http.get("/admin/v1/prestage").json()["prestages"]:
        if entry["source"] == source:
            return [n["state"] for n in entry["nodes"]]
    return []


def test_a_prestaged_model_scales_up_without_a_download(
    fleet: tuple[httpx.Client, Path],
    counted_server: tuple[str, collections.Counter[str]],
    demo_model: Path,
) -> None:
    http, _ = fleet
    source, gets = counted_server
    bad = http.post("/admin/v1/prestage", json={"source": str(demo_model)})
    assert bad.status_code == 400 and "nothing to fetch" in bad.json()["error"]["message"]
    assert bad.json()["error"]["param"] == "source"
    missing = http.post("/admin/v1/prestage", json={"deployment": "nope"})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "deployment"
    nowhere = http.post("/admin/v1/prestage", json={"source": source, "nodes": ["no-such-node"]})
    assert nowhere.status_code == 404 and nowhere.json()["error"]["param"] == "nodes"
    assert not gets

    answer = http.post("/admin/v1/prestage", json={"source": source})
    assert answer.status_code == 202, answer.text
    [node] = answer.json()["nodes"]
    assert node["state"] in ("requested", "fetching", "cached"), node
    _until(lambda: _prestage_states(http, source) == ["cached"], "prestaged")
    fetched = sum(n for path, n in gets.items() if not path.endswith("fleet-manifest.json"))
    assert fetched == len(list(demo_model.iterdir())), gets  # every file, once
    command = ["models", "-o", "json", "--coordinator", str(http.base_url)]
    listing = subprocess.run(
        [sys.executable, "-m", "fleet", *command], capture_output=True, text=True, timeout=60,
        check=True,
    )  # fmt: skip
    rows = json.loads(listing.stdout)["models"]
    assert [r["state"] for r in rows if r["source"] == source] == ["cached"], rows

    before = collections.Counter(gets)
    warm = {
        "apiVersion": "fleet.dev/v1alpha1",
        "kind": "FleetModel",
        "metadata": {"name": "warm"},
        "spec": {"servedModelNames": ["warm"], "source": source, "replicas": 1},
    }
    assert http.post("/admin/v1/deployments", json=warm).status_code == 201
    _until(lambda: "warm" in _models(http), "prestaged model deployed, engine ready")
    reply = http.post("/v1/completions", json={"model": "warm", "prompt": "Hi", "max_tokens": 2})
    assert reply.status_code == 200
    # The scale-up started warm: the agent requested nothing. Only the coordinator may have
    # asked for the tokenizer files it routes by (never the weights).
    asked = [path.rsplit("/", 1)[-1] for path in gets - before]
    tokenizer_only = (*TOKENIZER_FILES, "fleet-manifest.json")
    assert all(any(fnmatch.fnmatch(n, p) for p in tokenizer_only) for n in asked), asked
    again = http.post("/admin/v1/prestage", json={"deployment": "warm"})
    assert again.status_code == 202 and again.json()["nodes"][0]["state"] == "cached"
    assert again.json()["nodes"][0]["pinned"] is True  # the engine uses it now
    assert http.delete("/admin/v1/deployments/warm").status_code == 200
    _until(lambda: "warm" not in _models(http), "warm deleted")
