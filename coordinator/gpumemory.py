"""How much GPU memory one engine takes on each GPU of its group, following vLLM's own rules.

What vLLM (v1, ``vllm/v1/worker/gpu_worker.py`` and ``vllm/v1/worker/utils.py``) does at start:

1. It creates its CUDA context, then takes a memory snapshot and computes its budget:
   ``requested = ceil(total × gpu_memory_utilization)`` (default 0.92, ``CacheConfig``), the
   fraction of the GPU's *total* memory, whatever else runs there. If the GPU has less than that
   free, it refuses to start (``request_memory``). The context itself is outside the budget.
2. It loads its shard of the weights, runs a dummy forward pass of ``max_num_batched_tokens``
   tokens and a dummy sampler pass of ``max_num_seqs`` rows (peak activations), measures CUDA
   graph memory, and gives the rest of the budget to the KV cache: ``kv = requested - weights -
   peak activations - non-torch growth - graphs``. With ``--kv-cache-memory-bytes`` the KV cache
   is that size instead (the budget check of step 1 still applies).
3. If ``kv`` cannot hold one request of ``max_model_len`` tokens it refuses to start
   (``_check_enough_kv_cache_memory``).

Fleet's model of one engine on one GPU of total ``T`` and free ``F``:

* ``need = weights / tp + activations + graphs + kv_min`` where ``kv_min`` is one
  ``max_model_len`` sequence of KV (``--max-model-len``, else the model's
  ``max_position_embeddings``; 0 for ``auto``) or ``--kv-cache-memory-bytes``;
  ``activations = tokens × (4 × hidden + 3 × intermediate / tp) × dtype bytes + seqs × vocab × 4``
  (hidden states, the MLP's gate/up and activation outputs, fp32 sampler logits), with
  ``tokens``/``seqs`` from the engine arguments, else vLLM's serving defaults on an H100-class
  GPU (8192 / 1024); ``graphs`` is :attr:`MemoryConfig.cuda_graph_bytes` (0 with
  ``--enforce-eager``).
* ``budget(T) = ceil(T × utilization)``; the GPU fits when ``budget(T) >= need`` (step 3) and
  ``F >= budget(T) + cuda_context_bytes`` (step 1).
* The engine then holds ``claim(T) = budget(T) + cuda_context_bytes`` of the GPU: that is what
  placement subtracts from the GPU's free memory for engines not yet running.

The activation estimate is an estimate: vLLM measures, Fleet cannot before it starts. Its error
is small against weights and KV for real models, and :class:`MemoryConfig` holds the constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fleet.protocol.errors import ConfigError

from .engineargs import EngineArgs
from .modelsize import ModelFootprint

GIB = 1 << 30
MIB = 1 << 20
#: vLLM's default ``--gpu-memory-utilization`` (``CacheConfig.gpu_memory_utilization``).
VLLM_DEFAULT_UTILIZATION = 0.92
_KV_DTYPE_BYTES = {
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "fp8_inc": 1,
    "fp8_ds_mla": 1,
    "float16": 2,
    "bfloat16": 2,
}
_DTYPE_BYTES = {"half": 2, "float16": 2, "bfloat16": 2, "float": 4, "float32": 4}


@dataclass(frozen=True)
class MemoryConfig:
    """The constants of the memory model.

    Args:
        cuda_context_bytes: what each engine process's CUDA context takes, outside vLLM's budget.
        cuda_graph_bytes: CUDA graph memory inside the budget (0 with ``--enforce-eager``).
        default_max_num_batched_tokens: when the engine arguments do not say (vLLM serving on
            an H100-class GPU).
        default_max_num_seqs: likewise.

    Raises:
        ConfigError: a negative or zero value (names the key).
    """

    cuda_context_bytes: int = 512 * MIB
    cuda_graph_bytes: int = 512 * MIB
    default_max_num_batched_tokens: int = 8192
    default_max_num_seqs: int = 1024

    def __post_init__(self) -> None:
        for key in ("cuda_context_bytes", "cuda_graph_bytes"):
            if getattr(self, key) < 0:
                raise ConfigError(key, getattr(self, key), "must be >= 0")
        for key in ("default_max_num_batched_tokens", "default_max_num_seqs"):
            if getattr(self, key) < 1:
                raise ConfigError(key, getattr(self, key), "must be >= 1")


@dataclass(frozen=True)
class EngineMemory:
    """One engine's memory on each GPU of its group.

    Attributes:
        weight_bytes: its shard of the weights (``ceil(weights / tp)``).
        kv_bytes: the least KV cache it starts with.
        activation_bytes: peak activations of the profiling pass, estimated.
        graph_bytes: CUDA graphs.
        context_bytes: the CUDA context, outside the budget.
        utilization: ``--gpu-memory-utilization``.
    """

    weight_bytes: int
    kv_bytes: int
    activation_bytes: int
    graph_bytes: int
    context_bytes: int
    utilization: float = VLLM_DEFAULT_UTILIZATION

    @property
    def need_bytes(self) -> int:
        """The least budget the engine starts with."""
        return self.weight_bytes + self.kv_bytes + self.activation_bytes + self.graph_bytes

    def budget_bytes(self, total_bytes: int) -> int:
        """vLLM's budget on a GPU of ``total_bytes``: ``ceil(total × utilization)``."""
        return math.ceil(total_bytes * self.utilization)

    def claim_bytes(self, total_bytes: int) -> int:
        """What the running engine holds on a GPU of ``total_bytes``: budget plus context."""
        return self.budget_bytes(total_bytes) + self.context_bytes

    def fits(self, total_bytes: int, free_bytes: int) -> bool:
        """Whether vLLM would start on a GPU with this total and free memory."""
        return self.budget_bytes(total_bytes) >= self.need_bytes and free_bytes >= self.claim_bytes(
            total_bytes
        )


def engine_memory(
    footprint: ModelFootprint, args: EngineArgs, tp: int, cfg: MemoryConfig | None = None
) -> EngineMemory:
    """Apply the model of the module docstring.

    Args:
        footprint: the model's sizes.
        args: the deployment's engine arguments.
        tp: GPUs per engine.
        cfg: the constants.

    Returns:
        The engine's memory on each of its GPUs.
    """
    cfg = cfg or MemoryConfig()
    act_bytes = _DTYPE_BYTES.get(args.dtype or "", footprint.dtype_bytes)
    kv_dtype = _KV_DTYPE_BYTES.get(args.kv_cache_dtype or "", act_bytes)
    if args.kv_cache_memory_bytes is not None:
        kv = args.kv_cache_memory_bytes
    else:
        max_len = args.max_model_len or footprint.max_position_embeddings
        kv = max(max_len, 0) * footprint.kv_bytes_per_token(tp, kv_dtype)
    tokens = args.max_num_batched_tokens or cfg.default_max_num_batched_tokens
    seqs = args.max_num_seqs or cfg.default_max_num_seqs
    per_token = 4 * footprint.hidden_size + 3 * footprint.intermediate_size // tp
    activations = tokens * per_token * act_bytes + seqs * footprint.vocab_size * 4
    return EngineMemory(
        weight_bytes=math.ceil(footprint.weight_bytes / tp),
        kv_bytes=kv,
        activation_bytes=activations,
        graph_bytes=0 if args.enforce_eager else cfg.cuda_graph_bytes,
        context_bytes=cfg.cuda_context_bytes,
        utilization=args.gpu_memory_utilization or VLLM_DEFAULT_UTILIZATION,
    )


def gib(nbytes: int) -> str:
    """``38 GiB``, ``0.5 GiB``: one decimal, trailing ``.0`` dropped."""
    text = f"{nbytes / GIB:.1f}"
    return (text[:-2] if text.endswith(".0") else text) + " GiB"


__all__ = [
    "GIB",
    "MIB",
    "VLLM_DEFAULT_UTILIZATION",
    "EngineMemory",
    "MemoryConfig",
    "engine_memory",
    "gib",
]
