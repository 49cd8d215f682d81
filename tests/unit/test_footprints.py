"""GPU memory of deployments from their model folders (fleet.coordinator.footprints)."""

from __future__ import annotations

from pathlib import Path

from fleet.coordinator.deployment import Deployment
from fleet.coordinator.footprints import with_memory
from fleet.coordinator.modelsize import ModelFootprint, safetensors_bytes


def test_gpu_engines_of_a_local_model_get_their_memory(demo_model: Path) -> None:
    cache: dict[str, ModelFootprint | None] = {}
    gpu = Deployment("demo", str(demo_model), gpus_per_engine=1, max_model_len=512)
    tp2 = Deployment("demo", str(demo_model), gpus_per_engine=2, name="demo-tp2")
    cpu = Deployment("demo", str(demo_model), name="demo-cpu")
    remote = Deployment("hub", "hf://org/model@main", gpus_per_engine=1)
    missing = Deployment("gone", "/nowhere/at/all", gpus_per_engine=1)
    one, two, on_cpu, on_hub, lost = with_memory((gpu, tp2, cpu, remote, missing), cache)
    assert one.memory is not None and two.memory is not None
    weights = safetensors_bytes(demo_model)
    assert one.memory.weight_bytes == weights and two.memory.weight_bytes == -(-weights // 2)
    assert one.memory.kv_bytes > 0  # 512 tokens of KV cache
    assert on_cpu.memory is None and on_hub.memory is None and lost.memory is None
    assert set(cache) == {str(demo_model), "/nowhere/at/all"} and cache["/nowhere/at/all"] is None
