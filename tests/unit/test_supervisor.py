"""The engine supervisor against real child processes (a small stand-in engine, not vLLM).

The stand-in takes vLLM's flags and misbehaves on request (tests/unit/fake_engine.py), so every
path of supervision runs with real fork/exec, signals, process groups and HTTP probes in about a
second each. Real vLLM under the same supervisor is covered by tests/integration.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys
from pathlib import Path

import httpx
import pytest
import trio

from fleet.agent.launcher import LaunchConfig, engine_command, free_port
from fleet.agent.supervisor import EngineSupervisor, SupervisorConfig
from fleet.protocol.errors import ConfigError
from fleet.protocol.messages import EngineSpec

ROOT = Path(__file__).resolve().parents[2]
# Fast probes, but a probe of a healthy engine never times out on a busy machine: with 0.3 s
# and 2 misses, a loaded CI machine could restart a healthy engine (and reorder the states a
# test expects). The hung-API test sets its own short timeout: a hang is its subject.
FAST = SupervisorConfig(
    startup_timeout_s=20,
    health_interval_s=0.1,
    startup_poll_s=0.05,
    health_timeout_s=5.0,
    unhealthy_after=2,
    backoff_base_s=0.05,
    backoff_max_s=0.2,
    grace_s=1.0,
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _supervisor(
    client: httpx.AsyncClient, mode: str, tmp_path: Path, cfg: SupervisorConfig = FAST
) -> EngineSupervisor:
    env = (
        ("FAKE_ENGINE_MODE", mode),
        ("FAKE_ENGINE_CHILD_FILE", str(tmp_path / "children")),
        ("PYTHONPATH", str(ROOT)),
    )
    launch = LaunchConfig(python=sys.executable, module="tests.unit.fake_engine", env=env)
    spec = EngineSpec(engine_id="e0", model="m", model_path="/nowhere")
    return EngineSupervisor(
        spec, launch=launch, cfg=cfg, kv_endpoint="tcp://127.0.0.1:1", client=client,
        log_dir=tmp_path / "logs",
    )  # fmt: skip


def _children(tmp_path: Path) -> list[int]:
    path = tmp_path / "children"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


async def _wait_state(sup: EngineSupervisor, state: str, *, restarts: int = 0) -> None:
    with trio.fail_after(20):
        while not (sup.state == state and sup.restarts >= restarts):
            await sup.changed()


async def test_ready_then_cancel_kills_the_whole_group(tmp_path: Path) -> None:
    async with httpx.AsyncClient() as client:
        sup = _supervisor(client, "ok", tmp_path)
        assert sup.replay_endpoint.startswith("tcp://127.0.0.1:")
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await _wait_state(sup, "ready")
            pid = sup.pid
            assert _alive(pid)
            assert sup.status().state == "ready" and sup.status().url == sup.url
            nursery.cancel_scope.cancel()
        assert sup.state == "stopped" and sup.pid == 0
        assert not _alive(pid)
        assert _children(tmp_path) and not any(_alive(c) for c in _children(tmp_path))


async def test_exit_with_status_zero_counts_as_a_crash(tmp_path: Path) -> None:
    async with httpx.AsyncClient() as client:
        sup = _supervisor(client, "exit0", tmp_path)
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            replay_endpoint = sup.replay_endpoint
            await _wait_state(sup, "ready", restarts=1)
            assert "exited with status 0" in sup.last_error
            # a restart binds a fresh replay port (the old one may have been taken meanwhile)
            assert sup.replay_endpoint != replay_endpoint
            assert sup.replay_endpoint.startswith("tcp://127.0.0.1:")
            nursery.cancel_scope.cancel()
        assert not any(_alive(c) for c in _children(tmp_path))


async def test_hung_api_is_killed_and_restarted(tmp_path: Path) -> None:
    cfg = SupervisorConfig(**{**FAST.__dict__, "health_timeout_s": 0.3})
    async with httpx.AsyncClient() as client:
        sup = _supervisor(client, "hang", tmp_path, cfg)
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await _wait_state(sup, "ready")
            first = sup.pid
            await _wait_state(sup, "starting", restarts=1)
            assert "/health failed" in sup.last_error
            assert not _alive(first)
            nursery.cancel_scope.cancel()


async def test_sigterm_ignored_means_sigkill_after_grace(tmp_path: Path) -> None:
    cfg = SupervisorConfig(**{**FAST.__dict__, "grace_s": 0.5})
    async with httpx.AsyncClient() as client:
        sup = _supervisor(client, "stubborn", tmp_path, cfg)
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await _wait_state(sup, "ready")
            pid = sup.pid
            t0 = trio.current_time()
            nursery.cancel_scope.cancel()
        took = trio.current_time() - t0
        assert not _alive(pid)
        assert 0.5 <= took < 5


async def test_missing_interpreter_backs_off_and_retries(tmp_path: Path) -> None:
    async with httpx.AsyncClient() as client:
        sup = _supervisor(client, "ok", tmp_path)
        sup.launch = LaunchConfig(python=str(tmp_path / "no-python"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.run)
            await _wait_state(sup, "backoff", restarts=2)
            assert "cannot start" in sup.last_error
            nursery.cancel_scope.cancel()


def test_killed_engine_pid_is_reported_then_replaced(tmp_path: Path) -> None:
    async def main() -> None:
        async with httpx.AsyncClient() as client:
            sup = _supervisor(client, "ok", tmp_path)
            async with trio.open_nursery() as nursery:
                await nursery.start(sup.run)
                await _wait_state(sup, "ready")
                states: list[tuple[str, str]] = []
                sup.on_change = lambda s: states.append((s.state, s.last_error))
                first = sup.pid
                os.kill(first, signal.SIGKILL)
                await _wait_state(sup, "ready", restarts=1)
                assert sup.pid != first and "status -9" in sup.last_error
                # Out of routing at once (the rest of its group is reaped after), then backoff.
                assert states[0][0] == "stopping" and "status -9" in states[0][1]
                assert [s for s, _ in states[:3]] == ["stopping", "backoff", "starting"]
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_backoff_grows_and_caps() -> None:
    cfg = SupervisorConfig(backoff_base_s=1, backoff_factor=2, backoff_max_s=10)
    assert [cfg.backoff(i) for i in range(6)] == [1, 2, 4, 8, 10, 10]


@pytest.mark.parametrize(
    "bad",
    [{"health_interval_s": 0}, {"backoff_factor": 0.5}, {"unhealthy_after": 0}, {"grace_s": -1}],
)
def test_bad_supervisor_config_is_rejected(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        SupervisorConfig(**bad)  # type: ignore[arg-type]


def test_vllm_command_line() -> None:
    spec = EngineSpec(engine_id="e", model="demo", model_path="/m", block_size=32)
    argv = engine_command(spec, LaunchConfig(python="py"), port=9, kv_endpoint="tcp://h:1")
    assert argv[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(argv)
    assert "--served-model-name demo" in joined and "--port 9" in joined
    assert "--enable-prefix-caching" in argv and "--block-size 32" in joined
    assert '"endpoint": "tcp://h:1"' in joined and "--dtype float32" in joined
    gpu = engine_command(
        EngineSpec(engine_id="e", model="d", model_path="/m", gpus=(0, 1)),
        LaunchConfig(python="py"),
        port=9,
        kv_endpoint="tcp://h:1",
    )
    assert "--tensor-parallel-size" in gpu and "--dtype" not in gpu


def test_engine_command_names_the_replay_endpoint() -> None:
    spec = EngineSpec(engine_id="e", model="demo", model_path="/m")
    plain = " ".join(
        engine_command(spec, LaunchConfig(python="py"), port=9, kv_endpoint="tcp://h:1")
    )
    assert "replay_endpoint" not in plain
    argv = engine_command(
        spec, LaunchConfig(python="py"), port=9, kv_endpoint="tcp://h:1",
        replay_endpoint="tcp://127.0.0.1:7",
    )  # fmt: skip
    assert '"replay_endpoint": "tcp://127.0.0.1:7"' in " ".join(argv)


def test_free_port_never_hands_out_the_same_port_twice() -> None:
    """Engines started together must not race for one port the kernel offered twice."""
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    for port in ports[:20]:  # each was free when handed out
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_rank_command_lines() -> None:
    """Ranks of a group spread over nodes run ``vllm serve`` (fleet.agent.vllm_serve): rank 0
    with the API and KV events, the others headless; a group on one node is one process."""
    base = EngineSpec("tp-0", "demo", "/m", tensor_parallel_size=2, nnodes=2, group="tp-0",
                      master_addr="10.0.0.1", master_port=29500)  # fmt: skip
    cfg = LaunchConfig(python="py")
    head = engine_command(base, cfg, port=9, kv_endpoint="tcp://h:1")
    assert head[:4] == ["py", "-m", "fleet.agent.vllm_serve", "/m"]
    joined = " ".join(head)
    flags = ["--tensor-parallel-size 2", "--nnodes 2", "--node-rank 0", "--port 9",
             "--master-addr 10.0.0.1", "--master-port 29500", "--kv-events-config"]  # fmt: skip
    assert all(flag in joined for flag in flags)
    assert "--headless" not in head
    rank1 = engine_command(
        dataclasses.replace(base, engine_id="tp-0.rank1", node_rank=1), cfg, port=9, kv_endpoint=""
    )
    assert "--headless" in rank1 and "--port" not in rank1 and "--kv-events-config" not in rank1
    assert "--node-rank 1" in " ".join(rank1)
    packed = engine_command(
        EngineSpec("tp-0", "demo", "/m", tensor_parallel_size=2), cfg, port=9, kv_endpoint=""
    )
    assert "--tensor-parallel-size 2" in " ".join(packed) and "--nnodes" not in packed
