"""vLLM's ``--kv-transfer-config`` and the NixlConnector's ``kv_transfer_params`` round trip.

What it mirrors (vllm 0.32: vllm/config/kv_transfer.py, kv_connector/v1/nixl/pull_scheduler.py):

* **The config.** ``KVTransferConfig``'s keys (unknown ones refused, as vLLM's dataclass does);
  ``kv_role`` (``kv_producer`` | ``kv_consumer`` | ``kv_both``) is required with a
  ``kv_connector``; ``engine_id`` defaults to a fresh uuid4. Connector names are vLLM's
  registered ones; an unknown name is refused at start, as vLLM's factory does.
* **Prefill side** (any role; llm-d runs both sides ``kv_both``): a request whose
  ``kv_transfer_params`` has ``do_remote_decode: true`` runs as usual and its non-streamed
  response carries ``kv_transfer_params`` = :func:`prefill_answer` (``do_remote_prefill: true``,
  the request's block ids, this engine's id and NIXL side channel, ``remote_num_tokens``, ...).
* **Decode side**: a request whose ``kv_transfer_params`` has ``do_remote_prefill: true`` and the
  remote fields (:func:`wants_remote_prefill`) loads its prompt's blocks from the prefill engine
  instead of computing them: all prompt tokens not in the local prefix cache count as loaded
  (``vllm:external_prefix_cache_hits``), the load takes :meth:`.LatencyModel.transfer_s`
  beside the steps, and only the last prompt token is computed (for its logits), as vLLM
  recomputes it. Without a connector the params are ignored, as vLLM ignores
  them.

Only the NIXL connectors (``NixlConnector``, ``NixlPullConnector``) are simulated; any other
registered connector is accepted and has no effect (logged once).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from fleet.protocol.errors import ConfigError

KV_TRANSFER_KEYS: Final[frozenset[str]] = frozenset(
    {
        "kv_connector",
        "engine_id",
        "kv_buffer_device",
        "kv_role",
        "kv_port",
        "kv_connector_extra_config",
        "kv_connector_module_path",
        "enable_permute_local_kv",
        "kv_load_failure_policy",
    }
)
KV_ROLES: Final[tuple[str, ...]] = ("kv_producer", "kv_consumer", "kv_both")
#: vLLM 0.32's registered connectors (kv_connector/factory.py).
CONNECTORS: Final[tuple[str, ...]] = (
    "ExampleConnector",
    "ExampleHiddenStatesConnector",
    "LMCacheConnectorV1",
    "LMCacheMPConnector",
    "NixlConnector",
    "NixlPullConnector",
    "NixlPushConnector",
    "MultiConnector",
    "HiSparseConnector",
    "MoRIIOConnector",
    "OffloadingConnector",
    "DecodeBenchConnector",
    "MooncakeConnector",
    "MooncakeStoreConnector",
    "FlexKVConnectorV1",
    "SimpleCPUOffloadConnector",
    "HF3FSKVConnector",
)
SIMULATED: Final[tuple[str, ...]] = ("NixlConnector", "NixlPullConnector")
#: vllm/envs.py defaults of the NIXL side channel.
DEFAULT_SIDE_CHANNEL_HOST: Final[str] = "localhost"
DEFAULT_SIDE_CHANNEL_PORT: Final[int] = 5600
#: Fields a decode request needs to pull (pull_scheduler.py checks these).
REMOTE_FIELDS: Final[tuple[str, ...]] = (
    "remote_engine_id",
    "remote_block_ids",
    "remote_host",
    "remote_port",
)


@dataclass(frozen=True)
class KVTransferSettings:
    """A validated ``--kv-transfer-config``.

    Attributes:
        connector: ``kv_connector``.
        role: ``kv_role``.
        engine_id: ``engine_id`` (given, or a fresh uuid4 as vLLM makes one).
        side_channel_host: ``VLLM_NIXL_SIDE_CHANNEL_HOST``.
        side_channel_port: ``VLLM_NIXL_SIDE_CHANNEL_PORT``.
        extra: ``kv_connector_extra_config``.
    """

    connector: str
    role: str
    engine_id: str
    side_channel_host: str = DEFAULT_SIDE_CHANNEL_HOST
    side_channel_port: int = DEFAULT_SIDE_CHANNEL_PORT
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def simulated(self) -> bool:
        """Whether this connector's round trip is simulated (the NIXL ones)."""
        return self.connector in SIMULATED


def parse_kv_transfer_config(
    text: str | None, environ: Mapping[str, str]
) -> KVTransferSettings | None:
    """Parse ``--kv-transfer-config`` as vLLM reads it.

    Args:
        text: the JSON object, or None when the flag was not given.
        environ: where ``VLLM_NIXL_SIDE_CHANNEL_HOST``/``_PORT`` are read.

    Returns:
        The settings, or None without a flag or without a ``kv_connector``.

    Raises:
        ConfigError: not a JSON object, an unknown key or connector, a missing or bad
            ``kv_role``, or a bad side-channel port.
    """
    if text is None:
        return None
    flag = "--kv-transfer-config"
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ConfigError(flag, text, f"is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(flag, text, "must be a JSON object")
    unknown = sorted(set(raw) - KV_TRANSFER_KEYS)
    if unknown:
        raise ConfigError(flag, text, f"unknown keys {unknown}")
    connector = raw.get("kv_connector")
    if connector is None:
        return None
    if connector not in CONNECTORS:
        raise ConfigError(f"{flag}.kv_connector", connector, f"must be one of {CONNECTORS}")
    role = raw.get("kv_role")
    if role not in KV_ROLES:
        why = f"is required with kv_connector; one of {KV_ROLES}"
        raise ConfigError(f"{flag}.kv_role", role, why)
    engine_id = raw.get("engine_id") or str(uuid.uuid4())
    extra = raw.get("kv_connector_extra_config") or {}
    if not isinstance(engine_id, str) or not isinstance(extra, dict):
        raise ConfigError(flag, text, "engine_id must be a string, extra config an object")
    port_text = environ.get("VLLM_NIXL_SIDE_CHANNEL_PORT", str(DEFAULT_SIDE_CHANNEL_PORT))
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError("VLLM_NIXL_SIDE_CHANNEL_PORT", port_text, "must be a port number")
    return KVTransferSettings(
        connector=connector,
        role=role,
        engine_id=engine_id,
        side_channel_host=environ.get("VLLM_NIXL_SIDE_CHANNEL_HOST", DEFAULT_SIDE_CHANNEL_HOST),
        side_channel_port=int(port_text),
        extra=extra,
    )


def wants_remote_decode(params: Mapping[str, Any] | None) -> bool:
    """A prefill request: ``do_remote_decode`` is true."""
    return bool(params and params.get("do_remote_decode"))


def wants_remote_prefill(params: Mapping[str, Any] | None) -> bool:
    """A decode request whose prompt's blocks come from a remote prefill:
    ``do_remote_prefill`` is true and every remote field is there."""
    return bool(
        params
        and params.get("do_remote_prefill")
        and all(params.get(k) is not None for k in REMOTE_FIELDS)
    )


def prefill_answer(
    settings: KVTransferSettings,
    request_id: str,
    block_ids: Sequence[int],
    num_tokens: int,
    *,
    tp_size: int = 1,
) -> dict[str, Any]:
    """The ``kv_transfer_params`` a NIXL prefill engine returns (pull mode), in vLLM's order.

    Args:
        settings: the engine's connector settings.
        request_id: the engine's id of the finished prefill request.
        block_ids: the blocks that hold its KV (one KV cache group).
        num_tokens: its computed tokens (``remote_num_tokens``).
        tp_size: the engine's tensor-parallel size.
    """
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": [list(block_ids)],
        "remote_engine_id": settings.engine_id,
        "remote_request_id": request_id,
        "remote_host": settings.side_channel_host,
        "remote_port": settings.side_channel_port,
        "tp_size": tp_size,
        "dcp_size": 1,
        "pp_size": 1,
        "remote_num_tokens": num_tokens,
        "remote_blocks_expiry_time": None,
        "transfer_mode": "pull",
    }


__all__ = [
    "CONNECTORS",
    "KV_ROLES",
    "KV_TRANSFER_KEYS",
    "REMOTE_FIELDS",
    "SIMULATED",
    "KVTransferSettings",
    "parse_kv_transfer_config",
    "prefill_answer",
    "wants_remote_decode",
    "wants_remote_prefill",
]
