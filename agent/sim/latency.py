"""How long one scheduler step of the simulated engine takes.

vLLM runs one forward pass per scheduler step over everything scheduled in it: prompt chunks of
newly admitted (or preempted) requests and one token for each request that is decoding. The
model here is the usual first-order one for a GPU:

* **Prefill** is compute-bound: each prompt token the step actually computes costs
  ``prefill_ms_per_token``. Tokens served from the prefix cache are not computed, so a cache hit
  shortens time to first token by exactly the hit tokens times that cost.
* **Decode** is memory-bound: a step that decodes ``n`` sequences costs
  ``decode_ms_per_token * (1 + decode_batch_slope * (n - 1))``; the weights are read once per
  step and shared by the batch, so each further sequence adds only a fraction.

A step with both pays both (vLLM batches them into one pass). Defaults are round numbers for an
8B model in bf16 on one H100: about 20k prompt tokens/s of prefill, 8 ms inter-token latency at
batch size 1, about 18 ms at 64.

* **KV transfer** (a P/D decode request loading its prompt's KV from a prefill engine, NIXL):
  ``kv_transfer_base_ms + kv_transfer_ms_per_token * tokens``. It runs beside the steps (NIXL
  reads asynchronously; vLLM parks the request in ``WAITING_FOR_REMOTE_KVS`` meanwhile), so it
  delays that request's first token, not the batch. The default is an 8B model's 128 KiB of bf16
  KV per token (32 layers x 8 KV heads x 128 x K and V x 2 bytes) at about 32 GB/s, two thirds
  of one 400 Gb/s RDMA NIC, plus 1 ms for the transfer's handshake and notification.

==========================  =======  ====================================================
parameter                   default  meaning
==========================  =======  ====================================================
prefill_ms_per_token        0.05     per prompt token computed (not cached)
decode_ms_per_token         8.0      a decode step with one sequence (ITL at batch 1)
decode_batch_slope          0.02     extra fraction of the above per further sequence
kv_transfer_ms_per_token    0.004    per prompt token loaded from a prefill engine
kv_transfer_base_ms         1.0      per KV transfer
==========================  =======  ====================================================

The ``slow_factor`` fault multiplies the whole step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from fleet.protocol.errors import ConfigError

DEFAULT_PREFILL_MS_PER_TOKEN: Final[float] = 0.05
DEFAULT_DECODE_MS_PER_TOKEN: Final[float] = 8.0
DEFAULT_DECODE_BATCH_SLOPE: Final[float] = 0.02
DEFAULT_KV_TRANSFER_MS_PER_TOKEN: Final[float] = 0.004
DEFAULT_KV_TRANSFER_BASE_MS: Final[float] = 1.0


@dataclass(frozen=True)
class LatencyModel:
    """Step-time model of a simulated engine (milliseconds in, seconds out).

    Attributes:
        prefill_ms_per_token: cost of each prompt token computed in a step.
        decode_ms_per_token: cost of a decode step with a single sequence.
        decode_batch_slope: extra fraction of ``decode_ms_per_token`` per further decoding
            sequence in the same step.
        kv_transfer_ms_per_token: cost of each prompt token a P/D decode request loads.
        kv_transfer_base_ms: cost of each such load, whatever its size.

    Raises:
        ConfigError: a value is negative, NaN or infinite (names the flag).
    """

    prefill_ms_per_token: float = DEFAULT_PREFILL_MS_PER_TOKEN
    decode_ms_per_token: float = DEFAULT_DECODE_MS_PER_TOKEN
    decode_batch_slope: float = DEFAULT_DECODE_BATCH_SLOPE
    kv_transfer_ms_per_token: float = DEFAULT_KV_TRANSFER_MS_PER_TOKEN
    kv_transfer_base_ms: float = DEFAULT_KV_TRANSFER_BASE_MS

    def __post_init__(self) -> None:
        for key, value in (
            ("--sim-prefill-ms-per-token", self.prefill_ms_per_token),
            ("--sim-decode-ms-per-token", self.decode_ms_per_token),
            ("--sim-decode-batch-slope", self.decode_batch_slope),
            ("--sim-kv-transfer-ms-per-token", self.kv_transfer_ms_per_token),
            ("--sim-kv-transfer-base-ms", self.kv_transfer_base_ms),
        ):
            if not math.isfinite(value) or value < 0:
                raise ConfigError(key, value, "must be a finite number >= 0")

    def step_s(self, *, prefill_tokens: int, decode_seqs: int, slow_factor: float = 1.0) -> float:
        """Return the duration of one step in seconds.

        Args:
            prefill_tokens: prompt tokens computed in the step (cache hits excluded).
            decode_seqs: sequences that decode one token in the step.
            slow_factor: the ``slow_factor`` fault (1 = normal speed).

        Returns:
            The step's duration, >= 0.
        """
        ms = self.prefill_ms_per_token * prefill_tokens
        if decode_seqs > 0:
            ms += self.decode_ms_per_token * (1 + self.decode_batch_slope * (decode_seqs - 1))
        return ms * slow_factor / 1000.0

    def transfer_s(self, tokens: int) -> float:
        """Return how long loading ``tokens`` prompt tokens' KV from a prefill engine takes
        (seconds; 0 for none)."""
        if tokens <= 0:
            return 0.0
        return (self.kv_transfer_base_ms + self.kv_transfer_ms_per_token * tokens) / 1000.0


__all__ = [
    "DEFAULT_DECODE_BATCH_SLOPE",
    "DEFAULT_DECODE_MS_PER_TOKEN",
    "DEFAULT_KV_TRANSFER_BASE_MS",
    "DEFAULT_KV_TRANSFER_MS_PER_TOKEN",
    "DEFAULT_PREFILL_MS_PER_TOKEN",
    "LatencyModel",
]
