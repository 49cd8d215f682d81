"""The simulator's command line: the agent's vLLM argv, ``--sim-*`` flags, faults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleet.agent.launcher import SIM_MODULE, LaunchConfig, engine_command
from fleet.agent.sim.config import parse_args, parse_kv_events_config
from fleet.agent.sim.faults import FaultState
from fleet.protocol.errors import ConfigError
from fleet.protocol.messages import EngineSpec


def _argv(tmp_path: Path, **spec: object) -> list[str]:
    engine = EngineSpec(engine_id="e", model="demo", model_path=str(tmp_path), kind="sim", **spec)  # type: ignore[arg-type]
    return engine_command(engine, LaunchConfig(python="py"), port=0, kv_endpoint="tcp://h:9")


def test_the_agent_launches_a_sim_with_vllms_flags(tmp_path: Path) -> None:
    vllm = engine_command(
        EngineSpec(engine_id="e", model="demo", model_path=str(tmp_path)),
        LaunchConfig(python="py"),
        port=0,
        kv_endpoint="tcp://h:9",
    )
    sim = _argv(tmp_path)
    assert sim[:3] == ["py", "-m", SIM_MODULE] and sim[3:] == vllm[3:]


def test_the_agents_argv_parses_into_the_same_engine(tmp_path: Path) -> None:
    argv = _argv(tmp_path, block_size=32, max_model_len=1024)
    cfg = parse_args(argv[3:], environ={})
    assert cfg.model_path == tmp_path and cfg.model_name == "demo"
    assert (cfg.host, cfg.port, cfg.block_size, cfg.max_model_len) == ("127.0.0.1", 0, 32, 1024)
    assert cfg.enable_prefix_caching and cfg.kv_events.enabled
    assert cfg.kv_events.endpoint == "tcp://h:9" and cfg.kv_events.topic == "kv"
    assert len(cfg.hash_seed) == 64 and cfg.ignored_args == ()  # random per engine


def test_gpu_flags_and_unknown_vllm_flags_are_tolerated(tmp_path: Path) -> None:
    argv = _argv(tmp_path, gpus=(0, 1), extra_args=("--gpu-memory-utilization", "0.8", "--foo"))
    cfg = parse_args(argv[3:], environ={})
    assert cfg.tensor_parallel_size == 2
    assert cfg.ignored_args == ("--gpu-memory-utilization", "0.8", "--foo")


def test_vllm_sizing_flags_are_aliases_of_the_sim_flags(tmp_path: Path) -> None:
    base = [
        "--model",
        str(tmp_path),
        "--max-model-len",
        "64",
        "--block-size",
        "16",
        "--sim-hash-seed",
        "s",
    ]
    vllm = parse_args(
        [
            *base,
            "--num-gpu-blocks-override",
            "9",
            "--max-num-seqs",
            "3",
            "--max-num-batched-tokens",
            "77",
        ]
    )
    sim = parse_args(
        [
            *base,
            "--sim-num-blocks",
            "9",
            "--sim-max-num-seqs",
            "3",
            "--sim-max-batched-tokens",
            "77",
        ]
    )
    assert (vllm.num_blocks, vllm.max_num_seqs, vllm.max_batched_tokens) == (9, 3, 77)
    assert vllm == sim


def test_sim_flags(tmp_path: Path) -> None:
    cfg = parse_args(
        [
            "--model", str(tmp_path), "--max-model-len", "128",
            "--sim-prefill-ms-per-token", "0.5", "--sim-decode-ms-per-token", "20",
            "--sim-decode-batch-slope", "0.1", "--sim-hash-seed", "abc", "--sim-seed", "4",
            "--sim-fault", "hang", "--sim-fault", "slow_factor=2.5",
        ]
    )  # fmt: skip
    assert cfg.latency.prefill_ms_per_token == 0.5 and cfg.latency.decode_ms_per_token == 20
    assert cfg.hash_seed == "abc" and cfg.seed == 4
    assert cfg.faults == FaultState(hang=True, slow_factor=2.5)


def test_hash_seed_is_random_per_engine_unless_vllms_rule_is_asked(tmp_path: Path) -> None:
    base = ["--model", str(tmp_path), "--max-model-len", "64"]
    vllm = [*base, "--sim-hash-seed", "vllm"]
    assert parse_args(vllm, environ={"PYTHONHASHSEED": "0"}).hash_seed == "0"
    assert parse_args(vllm, environ={}).hash_seed == "vllm-none-hash"
    one = parse_args(base, environ={"PYTHONHASHSEED": "0"}).hash_seed
    two = parse_args([*base, "--sim-hash-seed", "random"]).hash_seed
    assert one != two and len(one) == len(two) == 64


def test_context_length_defaults_to_the_models(demo_model: Path) -> None:
    assert parse_args(["--model", str(demo_model)]).max_model_len == 2048


@pytest.mark.parametrize(
    "extra",
    [
        ["--block-size", "0"],
        ["--sim-num-blocks", "3"],  # cannot hold one 64-token sequence in blocks of 16
        ["--sim-prefill-ms-per-token", "-1"],
        ["--sim-fault", "explode"],
        ["--sim-fault", "fail_fraction=2"],
        ["--sim-fault", "hang=maybe"],
        ["--kv-events-config", "[1]"],
        ["--kv-events-config", '{"enable_kv_cache_events": true, "bogus": 1}'],
        ["--kv-events-config", '{"buffer_steps": -1}'],
    ],
)
def test_bad_values_raise_config_error(tmp_path: Path, extra: list[str]) -> None:
    with pytest.raises(ConfigError):
        parse_args(["--model", str(tmp_path), "--max-model-len", "64", *extra])


def test_a_misspelt_sim_flag_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--model", str(tmp_path), "--sim-decode-ms", "3"])
    assert exc.value.code == 2


def test_kv_events_config_like_vllm() -> None:
    assert not parse_kv_events_config(None).enabled
    off = parse_kv_events_config(json.dumps({"enable_kv_cache_events": True, "publisher": "null"}))
    assert not off.enabled
    on = parse_kv_events_config(
        json.dumps({"enable_kv_cache_events": True, "replay_endpoint": "tcp://*:5558"})
    )
    assert on.enabled and on.endpoint == "tcp://*:5557" and on.replay_endpoint == "tcp://*:5558"
    assert on.buffer_steps == 10_000 and on.hwm == 100_000 and on.topic == ""


def test_fault_updates_are_validated_as_a_whole() -> None:
    state = FaultState().updated({"hang": True, "kv_drop_fraction": 0.5})
    assert state.hang and state.kv_drop_fraction == 0.5
    for bad in ({"hang": 1}, {"slow_factor": 0}, {"fail_fraction": "x"}, {"nope": True}):
        with pytest.raises(ConfigError):
            state.updated(bad)
    assert state.updated({}) == state


def test_the_public_surface_is_pinned() -> None:
    import fleet.agent.sim as sim

    assert sorted(sim.__all__) == [
        "FaultState",
        "KVEventsSettings",
        "LatencyModel",
        "PrefixCache",
        "RequestStream",
        "Scheduler",
        "SimConfig",
        "SimEngine",
        "SimRequest",
        "SimServer",
        "StepPlan",
        "StepResult",
        "TokenOutput",
        "external_hash",
        "hash_block",
        "none_hash",
        "parse_args",
    ]
    assert all(hasattr(sim, name) for name in sim.__all__)
