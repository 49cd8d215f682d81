"""The per-GPU memory model of one engine (fleet.coordinator.gpumemory), following vLLM's rules:
a budget of gpu_memory_utilization x TOTAL memory that must be free, holding weights / tp,
activations, CUDA graphs and at least one max-model-len sequence of KV cache."""

from __future__ import annotations

import math

import pytest

from fleet.coordinator.engineargs import EngineArgs
from fleet.coordinator.gpumemory import (
    GIB,
    MIB,
    EngineMemory,
    MemoryConfig,
    engine_memory,
    gib,
)
from fleet.coordinator.modelsize import ModelFootprint
from fleet.protocol.errors import ConfigError

LLAMA_8B = ModelFootprint(
    weight_bytes=16 * GIB,
    num_layers=32,
    num_kv_heads=8,
    head_dim=128,
    hidden_size=4096,
    intermediate_size=14336,
    vocab_size=128256,
    max_position_embeddings=131072,
    dtype_bytes=2,
)


def test_llama_8b_on_one_gpu() -> None:
    mem = engine_memory(LLAMA_8B, EngineArgs(max_model_len=8192), tp=1)
    assert mem.weight_bytes == 16 * GIB
    assert mem.kv_bytes == 8192 * 2 * 32 * 8 * 128 * 2  # one 8192-token sequence: 1 GiB
    assert mem.activation_bytes == 8192 * (4 * 4096 + 3 * 14336) * 2 + 1024 * 128256 * 4
    assert (mem.graph_bytes, mem.context_bytes, mem.utilization) == (512 * MIB, 512 * MIB, 0.92)
    assert gib(mem.need_bytes) == "18.9 GiB"
    # An 80 GiB GPU: vLLM asks for 92 % of the TOTAL, free, plus its CUDA context.
    total = 80 * GIB
    assert mem.budget_bytes(total) == math.ceil(total * 0.92)
    assert mem.claim_bytes(total) == math.ceil(total * 0.92) + 512 * MIB
    assert mem.fits(total, free_bytes=total)
    assert not mem.fits(total, free_bytes=60 * GIB)  # 60 GiB free is far above the need, but
    # vLLM refuses to start below 73.6 GiB free
    assert mem.fits(24 * GIB, free_bytes=24 * GIB)  # 22.1 GiB budget >= 18.9 GiB
    assert not mem.fits(20 * GIB, free_bytes=20 * GIB)  # 18.4 GiB budget < 18.9 GiB


def test_default_max_model_len_is_the_models_and_auto_needs_none() -> None:
    full = engine_memory(LLAMA_8B, EngineArgs(), tp=1)
    assert full.kv_bytes == 131072 * 131072  # 16 GiB: vLLM must hold one full-length sequence
    assert engine_memory(LLAMA_8B, EngineArgs(max_model_len=-1), tp=1).kv_bytes == 0


def test_tensor_parallel_splits_weights_kv_and_mlp() -> None:
    one = engine_memory(LLAMA_8B, EngineArgs(max_model_len=8192), tp=1)
    two = engine_memory(LLAMA_8B, EngineArgs(max_model_len=8192), tp=2)
    assert two.weight_bytes == 8 * GIB
    assert two.kv_bytes == one.kv_bytes // 2
    assert two.activation_bytes == 8192 * (4 * 4096 + 3 * 14336 // 2) * 2 + 1024 * 128256 * 4
    odd = engine_memory(ModelFootprint(weight_bytes=10), EngineArgs(), tp=3)
    assert odd.weight_bytes == 4  # rounded up


def test_engine_arguments_change_the_model() -> None:
    args = EngineArgs(
        gpu_memory_utilization=0.5,
        max_model_len=4096,
        kv_cache_dtype="fp8",
        max_num_batched_tokens=2048,
        max_num_seqs=64,
        enforce_eager=True,
    )
    mem = engine_memory(LLAMA_8B, args, tp=1)
    assert mem.utilization == 0.5
    assert mem.kv_bytes == 4096 * 2 * 32 * 8 * 128 * 1
    assert mem.activation_bytes == 2048 * (4 * 4096 + 3 * 14336) * 2 + 64 * 128256 * 4
    assert mem.graph_bytes == 0
    # Two engines at 0.5 do not share an 80 GiB GPU: each claims 40 GiB plus its CUDA context,
    # so the second finds 39.5 GiB free, less than its 40 GiB budget (vLLM refuses as well).
    assert mem.fits(80 * GIB, free_bytes=80 * GIB)
    assert not mem.fits(80 * GIB, free_bytes=80 * GIB - mem.claim_bytes(80 * GIB))
    half = engine_memory(
        LLAMA_8B, EngineArgs(gpu_memory_utilization=0.45, max_model_len=4096), tp=1
    )
    assert half.fits(80 * GIB, free_bytes=80 * GIB - half.claim_bytes(80 * GIB))
    explicit = engine_memory(LLAMA_8B, EngineArgs(kv_cache_memory_bytes=3 * GIB), tp=1)
    assert explicit.kv_bytes == 3 * GIB
    f32 = engine_memory(LLAMA_8B, EngineArgs(dtype="float32", max_model_len=1), tp=1)
    assert f32.kv_bytes == 2 * 32 * 8 * 128 * 4


def test_constants_are_configurable_and_checked() -> None:
    cfg = MemoryConfig(
        cuda_context_bytes=0,
        cuda_graph_bytes=0,
        default_max_num_batched_tokens=1,
        default_max_num_seqs=1,
    )
    mem = engine_memory(ModelFootprint(weight_bytes=GIB), EngineArgs(), tp=1, cfg=cfg)
    assert mem == EngineMemory(
        weight_bytes=GIB, kv_bytes=0, activation_bytes=0, graph_bytes=0, context_bytes=0
    )
    with pytest.raises(ConfigError, match="cuda_graph_bytes"):
        MemoryConfig(cuda_graph_bytes=-1)
    with pytest.raises(ConfigError, match="default_max_num_seqs"):
        MemoryConfig(default_max_num_seqs=0)


def test_gib_formatting() -> None:
    assert gib(38 * GIB) == "38 GiB"
    assert gib(GIB // 2) == "0.5 GiB"
    assert gib(int(73.6 * GIB)) == "73.6 GiB"
