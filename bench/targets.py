"""Start the things a benchmark measures: simulated engines, ``fleet up``, peer routers.

Every target is a real process tree on loopback, started here and stopped (whole process group)
when its context manager exits. Peers live in a virtualenv of the benchmarks' own
(``bench/.peers-venv``), never in Fleet's dependencies; :func:`ensure_peer` creates it on first use.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from fleet.agent.reaper import Reaper

HERE = Path(__file__).resolve().parent
PEERS_VENV = HERE / ".peers-venv"
PEERS = {"vllm-router": "vllm-router==0.1.17", "sglang-router": "sglang-router==0.3.2"}
MODEL_NAME = "demo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_model() -> Path:
    """The demo model the benchmarks serve (built once, offline)."""
    from fleet.demomodel import build_demo_model

    return build_demo_model(HERE / "results" / "models" / "demo")


@dataclass
class Proc:
    """A started process group and its log."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        self._stop()
        _reaper().forget(self.popen.pid)

    def _stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


def start(name: str, argv: Sequence[str], log_dir: Path, env: dict[str, str] | None = None) -> Proc:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    with open(log, "wb") as f:
        popen = subprocess.Popen(
            list(argv),
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    _reaper().watch(popen.pid)  # killed with the benchmark, even on SIGTERM or SIGKILL
    return Proc(name, popen, log)


@functools.cache
def _reaper() -> Reaper:
    return Reaper()


def wait_http(url: str, proc: Proc, timeout_s: float = 120, path: str = "/health") -> None:
    """Wait until ``url + path`` answers 200 (the process is a black box: ask it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited: {proc.log.read_text()[-2000:]}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name} not healthy at {url}{path} in {timeout_s} s")


def coordinator_argv(
    port: int, link: str, model: Path, *, replicas: int, extra: Sequence[str] = ()
) -> list[str]:
    """``fleet coordinator`` on loopback serving ``model`` as ``demo``, agents on ``link``."""
    return [
        *(sys.executable, "-m", "fleet", "coordinator", "--port", str(port)),
        *("--agent-endpoint", link, "--model", str(model), "--model-name", MODEL_NAME),
        *("--replicas", str(replicas), *extra),
    ]


def sim_argv(
    port: int,
    kv_endpoint: str | None,
    sim_args: Sequence[str],
    *,
    kind: str = "sim",
    names: Sequence[str] = (MODEL_NAME,),
) -> list[str]:
    """The same argv the agent gives an engine: a simulated one, or (``kind="vllm"``) a real
    vLLM CPU engine (``sim_args`` are then extra vLLM flags), serving the model as ``names``."""
    if kind == "vllm":
        head = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    else:
        head = [sys.executable, "-m", "fleet.agent.sim"]
    argv = [
        *head,
        "--model",
        str(demo_model()),
        "--served-model-name",
        *names,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "1024",
        "--block-size",
        "32",
        "--enable-prefix-caching",
        # the /render routes: vllm-router's cache_aware and kv_aware tokenize through them
        "--enable-scale-out",
    ]
    if kind == "vllm":
        argv += ["--dtype", "float32", "--enforce-eager"]
    if kv_endpoint:
        argv += [
            "--kv-events-config",
            f'{{"enable_kv_cache_events": true, "publisher": "zmq", '
            f'"endpoint": "{kv_endpoint}", "topic": ""}}',
        ]
    return argv + list(sim_args)


def engine_env(kind: str) -> dict[str, str]:
    """Environment for an engine of ``kind`` (a real CPU engine needs vLLM's CPU settings)."""
    if kind != "vllm":
        return {}
    from fleet.agent.launcher import CPU_ENGINE_ENV

    return {**CPU_ENGINE_ENV, "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}


@contextlib.contextmanager
def sims(
    n: int,
    log_dir: Path,
    sim_args: Sequence[str] = (),
    *,
    kv: bool = False,
    kind: str = "sim",
    names: Sequence[str] = (MODEL_NAME,),
) -> Iterator[list[tuple[str, str]]]:
    """``n`` engines (simulated, or real vLLM with ``kind="vllm"``) started directly, serving
    the model as ``names``; yields (url, kv endpoint) pairs."""
    procs: list[Proc] = []
    out: list[tuple[str, str]] = []
    try:
        for i in range(n):
            port = free_port()
            kv_endpoint = f"tcp://127.0.0.1:{free_port()}" if kv else ""
            endpoint = kv_endpoint.replace("127.0.0.1", "*") if kv else None
            argv = sim_argv(port, endpoint, sim_args, kind=kind, names=names)
            procs.append(start(f"{kind}-{i}", argv, log_dir, env=engine_env(kind)))
            out.append((f"http://127.0.0.1:{port}", kv_endpoint))
        for proc, (url, _) in zip(procs, out, strict=True):
            wait_http(url, proc, timeout_s=600 if kind == "vllm" else 120)
        yield out
    finally:
        for proc in procs:
            proc.stop()


@contextlib.contextmanager
def fleet_up(
    replicas: int,
    log_dir: Path,
    sim_args: Sequence[str] = (),
    extra: Sequence[str] = (),
    *,
    kind: str = "sim",
    pids: list[int] | None = None,
) -> Iterator[tuple[str, list[str]]]:
    """``fleet up --engine KIND``; yields the coordinator URL and the engines' own URLs.
    ``pids``, when given, gets the pid of the ``fleet up`` process (coordinator and agent; the
    engines are its children)."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "fleet",
        "up",
        "--engine",
        kind,
        "--replicas",
        str(replicas),
        "--port",
        str(port),
        "--model",
        str(demo_model()),
        "--model-name",
        MODEL_NAME,
        "--log-dir",
        str(log_dir / "fleet"),
    ]
    for arg in sim_args:
        argv.append(f"--engine-arg={arg}")  # "=": the value itself starts with "--"
    proc = start("fleet-up", [*argv, *extra], log_dir)
    if pids is not None:
        pids.append(proc.popen.pid)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url, proc, timeout_s=600, path="/readyz")
        deadline = time.monotonic() + 600
        while True:
            engines = httpx.get(url + "/api/v1/engines").json()["engines"]
            ready = [e["url"] for e in engines if e["state"] == "ready"]
            if len(ready) == replicas:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(ready)}/{replicas} engines ready")
            time.sleep(0.2)
        yield url, ready
    finally:
        proc.stop()


def ensure_peer(name: str) -> Path:
    """The peer's virtualenv ``bin/`` folder, installing the pinned peer on first use."""
    if not (PEERS_VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    pip = PEERS_VENV / "bin" / "pip"
    have = subprocess.run([str(pip), "show", name], capture_output=True, text=True).stdout
    version = PEERS[name].split("==")[1]
    if not re.search(rf"^Version: {re.escape(version)}$", have, re.M):
        subprocess.run([str(pip), "install", "-q", PEERS[name]], check=True)
    return PEERS_VENV / "bin"


@contextlib.contextmanager
def _router(
    name: str, argv: Sequence[str], port: int, log_dir: Path, pids: list[int] | None = None
) -> Iterator[str]:
    """Start a peer router listening on ``port``; yield its URL once ``/health`` answers
    (``pids``, when given, gets its process's pid)."""
    proc = start(name, argv, log_dir)
    if pids is not None:
        pids.append(proc.popen.pid)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url, proc, path="/health")
        yield url
    finally:
        proc.stop()


def vllm_router(
    worker_urls: Sequence[str],
    log_dir: Path,
    policy: str,
    extra: Sequence[str] = (),
    *,
    pids: list[int] | None = None,
) -> contextlib.AbstractContextManager[str]:
    """vllm-router (Rust, from PyPI) in front of ``worker_urls``; yields its URL."""
    bin_dir = ensure_peer("vllm-router")
    port = free_port()
    argv = [
        str(bin_dir / "vllm-router"),
        *("--host", "127.0.0.1", "--port", str(port), "--worker-urls", *worker_urls),
        *("--policy", policy, "--log-level", "warning", "--prometheus-port", str(free_port())),
        *extra,
    ]
    return _router(f"vllm-router-{policy}", argv, port, log_dir, pids)


def trio_floor(
    worker_urls: Sequence[str], log_dir: Path, *, pids: list[int] | None = None
) -> contextlib.AbstractContextManager[str]:
    """The minimal trio proxy (:mod:`.trio_floor`) in front of ``worker_urls``; yields its
    URL (its ``/health`` is an engine's)."""
    port = free_port()
    addresses = [url.split("//", 1)[1].rstrip("/") for url in worker_urls]
    argv = [sys.executable, "-m", "fleet.bench.trio_floor", str(port), *addresses]
    return _router("trio-floor", argv, port, log_dir, pids)


# sglang-router 0.3.2 asks its workers SGLang-only routes, names their model "unknown" and 404s
# any other model name unless a worker also serves "unknown" (shared/REFERENCE.md, section 5).
SGLANG_NAMES = (MODEL_NAME, "unknown")


def sglang_router(
    worker_urls: Sequence[str], log_dir: Path, policy: str, *, pids: list[int] | None = None
) -> contextlib.AbstractContextManager[str]:
    """sglang-router (Rust, from PyPI) in front of ``worker_urls``, which must serve the model
    also as ``unknown`` (:data:`SGLANG_NAMES`); yields its URL."""
    bin_dir = ensure_peer("sglang-router")
    port = free_port()
    argv = [
        *(str(bin_dir / "python"), "-m", "sglang_router.launch_router"),
        *("--host", "127.0.0.1", "--port", str(port), "--worker-urls", *worker_urls),
        *("--policy", policy, "--log-level", "warn", "--prometheus-port", str(free_port())),
    ]
    return _router(f"sglang-router-{policy}", argv, port, log_dir, pids)


__all__ = [
    "SGLANG_NAMES",
    "coordinator_argv",
    "demo_model",
    "ensure_peer",
    "fleet_up",
    "free_port",
    "sglang_router",
    "sims",
    "trio_floor",
    "vllm_router",
]
