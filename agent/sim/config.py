"""The simulator's command line: vLLM's own flags (as the agent passes them) plus ``--sim-*``.

The agent starts a simulated engine with exactly the argv it gives vLLM
(:func:`fleet.agent.launcher.engine_command`), only the module differs. So this parser accepts
vLLM's flags with vLLM's meaning; the three vLLM flags that size the engine keep that meaning here
(``--num-gpu-blocks-override``, ``--max-num-seqs``, ``--max-num-batched-tokens`` are aliases of
the ``--sim-*`` flags that set the same thing). Any other vLLM flag is tolerated and ignored
(``--engine-arg`` may pass any), with one log line naming it; an unknown ``--sim-*`` flag is an
error, so a misspelt simulator flag never goes unnoticed.

Everything is validated once, here, into a frozen :class:`SimConfig`; a bad value raises
:class:`~fleet.protocol.errors.ConfigError` naming the flag and the value.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from fleet.protocol.errors import ConfigError

from .faults import FaultState
from .kvtransfer import KVTransferSettings, parse_kv_transfer_config
from .latency import (
    DEFAULT_DECODE_BATCH_SLOPE,
    DEFAULT_DECODE_MS_PER_TOKEN,
    DEFAULT_KV_TRANSFER_BASE_MS,
    DEFAULT_KV_TRANSFER_MS_PER_TOKEN,
    DEFAULT_PREFILL_MS_PER_TOKEN,
    LatencyModel,
)

VLLM_VERSION: Final[str] = "0.32.0"
"""The vLLM release whose wire formats the simulator speaks."""

DEFAULT_NUM_BLOCKS: Final[int] = 16384
"""KV blocks, null block included, as vLLM counts ``num_gpu_blocks`` (a 1 GiB CPU cache of the
demo model at block size 32 has exactly this many)."""

DEFAULT_MAX_NUM_SEQS: Final[int] = 256
DEFAULT_MAX_BATCHED_TOKENS: Final[int] = 8192
DEFAULT_NONE_HASH_SEED: Final[str] = "vllm-none-hash"
"""vLLM 0.32's seed of ``NONE_HASH`` for sha256 when ``PYTHONHASHSEED`` is unset."""

_KV_EVENTS_KEYS: Final[frozenset[str]] = frozenset(
    {
        "enable_kv_cache_events",
        "publisher",
        "endpoint",
        "replay_endpoint",
        "buffer_steps",
        "hwm",
        "max_queue_size",
        "topic",
    }
)


@dataclass(frozen=True)
class KVEventsSettings:
    """vLLM's ``KVEventsConfig`` (vllm/config/kv_events.py), same names, same defaults.

    Attributes:
        enabled: ``enable_kv_cache_events``.
        endpoint: PUB endpoint; one with ``*``, ``::``, ``ipc://`` or ``inproc://`` binds,
            any other connects.
        replay_endpoint: ROUTER endpoint for replay requests (always bound), or None.
        buffer_steps: how many past batches replay can serve.
        hwm: the PUB socket's high-water mark (messages).
        topic: the first frame of every message.
    """

    enabled: bool = False
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    def as_json(self) -> dict[str, Any]:
        """The config as vLLM's ``/kv_event_sources`` shows it."""
        return {
            "enable_kv_cache_events": self.enabled,
            "publisher": "zmq" if self.enabled else "null",
            "endpoint": self.endpoint,
            "replay_endpoint": self.replay_endpoint,
            "buffer_steps": self.buffer_steps,
            "hwm": self.hwm,
            "max_queue_size": self.max_queue_size,
            "topic": self.topic,
        }


@dataclass(frozen=True)
class SimConfig:
    """One simulated engine, validated.

    Attributes:
        model_path: the model folder (tokenizer.json, tokenizer_config.json, chat template).
        served_model_names: names the API answers to; the first is reported in responses.
        host: address the HTTP server binds.
        port: HTTP port (0 picks a free one; the URL is printed once serving).
        max_model_len: context length in tokens (prompt + output).
        block_size: tokens per KV block.
        enable_prefix_caching: whether cached blocks are looked up and reused.
        kv_events: the KV-event publisher settings.
        tensor_parallel_size: only reported (``system_fingerprint``).
        num_blocks: KV blocks including vLLM's null block (usable: ``num_blocks - 1``).
        max_num_seqs: the most sequences running at once; more wait in FIFO order.
        max_batched_tokens: token budget of one scheduler step (chunked prefill above it).
        latency: the step-time model.
        hash_seed: the seed of ``NONE_HASH``, the parent hash of every first block.
        seed: seeds generated tokens and fault draws.
        faults: faults in force at start.
        enable_scale_out: serve the ``/render`` routes (vLLM's ``--enable-scale-out``).
        kv_transfer: the KV connector (``--kv-transfer-config``), or None.
        ignored_args: vLLM flags accepted but without effect here.
    """

    model_path: Path
    served_model_names: tuple[str, ...]
    host: str = "0.0.0.0"
    port: int = 8000
    max_model_len: int = 2048
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_events: KVEventsSettings = field(default_factory=KVEventsSettings)
    tensor_parallel_size: int = 1
    num_blocks: int = DEFAULT_NUM_BLOCKS
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_batched_tokens: int = DEFAULT_MAX_BATCHED_TOKENS
    latency: LatencyModel = field(default_factory=LatencyModel)
    hash_seed: str = DEFAULT_NONE_HASH_SEED
    seed: int = 0
    faults: FaultState = field(default_factory=FaultState)
    enable_scale_out: bool = False
    kv_transfer: KVTransferSettings | None = None
    ignored_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.served_model_names or not all(self.served_model_names):
            raise ConfigError("--served-model-name", self.served_model_names, "must be non-empty")
        for key, value, low in (
            ("--port", self.port, 0),
            ("--max-model-len", self.max_model_len, 1),
            ("--block-size", self.block_size, 1),
            ("--tensor-parallel-size", self.tensor_parallel_size, 1),
            ("--sim-num-blocks", self.num_blocks, 2),
            ("--sim-max-num-seqs", self.max_num_seqs, 1),
            ("--sim-max-batched-tokens", self.max_batched_tokens, 1),
        ):
            if value < low:
                raise ConfigError(key, value, f"must be >= {low}")
        if self.port > 65535:
            raise ConfigError("--port", self.port, "must be <= 65535")
        needed = -(-self.max_model_len // self.block_size)
        if self.num_blocks - 1 < needed:
            raise ConfigError(
                "--sim-num-blocks",
                self.num_blocks,
                f"must hold one max-model-len sequence: at least {needed + 1} blocks "
                f"({self.max_model_len} tokens in blocks of {self.block_size}, plus the null "
                "block)",
            )

    @property
    def model_name(self) -> str:
        """The name responses report (vLLM reports the first served name)."""
        return self.served_model_names[0]


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the simulator's flags (vLLM's subset plus ``--sim-*``)."""
    p = argparse.ArgumentParser(
        prog="python -m fleet.agent.sim",
        description="A simulated vLLM 0.32 engine: same HTTP API, metrics and KV events.",
        allow_abbrev=False,
    )
    v = p.add_argument_group("vLLM flags (same meaning as vLLM's)")
    v.add_argument("--model", required=True, help="model folder (tokenizer and chat template)")
    v.add_argument("--served-model-name", nargs="+", default=None, help="names served")
    v.add_argument("--host", default="0.0.0.0")
    v.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    v.add_argument("--max-model-len", type=int, default=None)
    v.add_argument("--block-size", type=int, default=16)
    caching = v.add_mutually_exclusive_group()
    caching.add_argument("--enable-prefix-caching", dest="prefix_caching", action="store_true")
    caching.add_argument("--no-enable-prefix-caching", dest="prefix_caching", action="store_false")
    p.set_defaults(prefix_caching=True)
    v.add_argument("--kv-events-config", default=None, help="vLLM's KVEventsConfig as JSON")
    v.add_argument(
        "--kv-transfer-config", default=None, help="vLLM's KVTransferConfig as JSON (P/D)"
    )
    v.add_argument("--prefix-caching-hash-algo", default="sha256", choices=["sha256"])
    v.add_argument("--dtype", default="auto", help="accepted, no effect")
    v.add_argument("--enforce-eager", action="store_true", help="accepted, no effect")
    v.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    v.add_argument(
        "--enable-scale-out",
        action="store_true",
        help="serve /v1/completions/render and /v1/chat/completions/render (403 otherwise)",
    )

    s = p.add_argument_group("simulator flags")
    s.add_argument(
        "--sim-num-blocks",
        "--num-gpu-blocks-override",
        dest="num_blocks",
        type=int,
        default=DEFAULT_NUM_BLOCKS,
        help="KV capacity in blocks, vLLM's null block included (default %(default)s)",
    )
    s.add_argument(
        "--sim-max-num-seqs",
        "--max-num-seqs",
        dest="max_num_seqs",
        type=int,
        default=DEFAULT_MAX_NUM_SEQS,
        help="sequences running at once; the rest wait FIFO (default %(default)s)",
    )
    s.add_argument(
        "--sim-max-batched-tokens",
        "--max-num-batched-tokens",
        dest="max_batched_tokens",
        type=int,
        default=DEFAULT_MAX_BATCHED_TOKENS,
        help="tokens per scheduler step; longer prefills are chunked (default %(default)s)",
    )
    s.add_argument(
        "--sim-prefill-ms-per-token",
        type=float,
        default=DEFAULT_PREFILL_MS_PER_TOKEN,
        help="step time per uncached prompt token computed (default %(default)s ms)",
    )
    s.add_argument(
        "--sim-decode-ms-per-token",
        type=float,
        default=DEFAULT_DECODE_MS_PER_TOKEN,
        help="time of a decode step with one sequence, i.e. the inter-token latency at "
        "batch size 1 (default %(default)s ms)",
    )
    s.add_argument(
        "--sim-decode-batch-slope",
        type=float,
        default=DEFAULT_DECODE_BATCH_SLOPE,
        help="each further sequence in a decode step adds this fraction of "
        "--sim-decode-ms-per-token to the step (default %(default)s)",
    )
    s.add_argument(
        "--sim-kv-transfer-ms-per-token",
        type=float,
        default=DEFAULT_KV_TRANSFER_MS_PER_TOKEN,
        help="a P/D decode request's KV load from its prefill engine: time per prompt token "
        "loaded (default %(default)s ms); the load delays that request, not the batch",
    )
    s.add_argument(
        "--sim-kv-transfer-base-ms",
        type=float,
        default=DEFAULT_KV_TRANSFER_BASE_MS,
        help="... and per load, whatever its size (default %(default)s ms)",
    )
    s.add_argument(
        "--sim-hash-seed",
        default="random",
        help="seed of NONE_HASH (default: 'random', one per process, as engines started with "
        "different hash seeds behave, so nothing may depend on hashes agreeing across engines); "
        "'vllm': vLLM 0.32's own rule ($PYTHONHASHSEED, else 'vllm-none-hash'); else a literal",
    )
    s.add_argument("--sim-seed", type=int, default=0, help="seeds generated tokens and faults")
    s.add_argument(
        "--sim-fault",
        action="append",
        default=[],
        metavar="NAME[=VALUE]",
        help="a fault in force at start (repeatable): crash, hang, slow_factor=F, "
        "fail_fraction=P, kv_drop_fraction=P, kv_duplicate_fraction=P",
    )
    return p


def parse_args(argv: Sequence[str], *, environ: dict[str, str] | None = None) -> SimConfig:
    """Parse and validate the simulator's command line.

    Args:
        argv: the arguments, without the program name.
        environ: the environment to read ``PYTHONHASHSEED`` from (default ``os.environ``).

    Returns:
        The validated configuration.

    Raises:
        SystemExit: argparse rejected the command line (status 2, usage printed).
        ConfigError: a flag has a value the simulator cannot accept.
    """
    env = dict(os.environ if environ is None else environ)
    parser = build_parser()
    args, unknown = parser.parse_known_args(list(argv))
    for arg in unknown:
        if arg.startswith("--sim-"):
            parser.error(f"unrecognized simulator argument: {arg}")
    model_path = Path(args.model)
    names = tuple(args.served_model_name or [args.model])
    max_model_len = args.max_model_len
    if max_model_len is None:
        max_model_len = model_context_length(model_path)
    latency = LatencyModel(
        prefill_ms_per_token=args.sim_prefill_ms_per_token,
        decode_ms_per_token=args.sim_decode_ms_per_token,
        decode_batch_slope=args.sim_decode_batch_slope,
        kv_transfer_ms_per_token=args.sim_kv_transfer_ms_per_token,
        kv_transfer_base_ms=args.sim_kv_transfer_base_ms,
    )
    hash_seed = args.sim_hash_seed
    if hash_seed == "vllm":
        hash_seed = env.get("PYTHONHASHSEED", DEFAULT_NONE_HASH_SEED)
    elif hash_seed == "random":
        hash_seed = os.urandom(32).hex()
    return SimConfig(
        model_path=model_path,
        served_model_names=names,
        host=args.host,
        port=args.port,
        max_model_len=max_model_len,
        block_size=args.block_size,
        enable_prefix_caching=args.prefix_caching,
        kv_events=parse_kv_events_config(args.kv_events_config),
        tensor_parallel_size=args.tensor_parallel_size,
        num_blocks=args.num_blocks,
        max_num_seqs=args.max_num_seqs,
        max_batched_tokens=args.max_batched_tokens,
        latency=latency,
        hash_seed=hash_seed,
        seed=args.sim_seed,
        faults=FaultState.from_specs(args.sim_fault),
        enable_scale_out=args.enable_scale_out,
        kv_transfer=parse_kv_transfer_config(args.kv_transfer_config, env),
        ignored_args=tuple(unknown),
    )


def parse_kv_events_config(text: str | None) -> KVEventsSettings:
    """Parse ``--kv-events-config`` the way vLLM reads it.

    Args:
        text: the JSON object, or None when the flag was not given.

    Returns:
        The settings; disabled when ``text`` is None or ``publisher`` is ``"null"``.

    Raises:
        ConfigError: not a JSON object, an unknown key, or a value of the wrong type.
    """
    if text is None:
        return KVEventsSettings()
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ConfigError("--kv-events-config", text, f"is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError("--kv-events-config", text, "must be a JSON object")
    unknown = sorted(set(raw) - _KV_EVENTS_KEYS)
    if unknown:
        raise ConfigError("--kv-events-config", text, f"unknown keys {unknown}")

    def typed(key: str, kind: type, default: Any) -> Any:
        value = raw.get(key, default)
        if value is None and default is None:
            return None
        if kind is int and (type(value) is not int or value < 0):
            raise ConfigError(f"--kv-events-config.{key}", value, "must be an int >= 0")
        if kind is not int and not isinstance(value, kind):
            raise ConfigError(f"--kv-events-config.{key}", value, f"must be a {kind.__name__}")
        return value

    enabled = typed("enable_kv_cache_events", bool, False)
    publisher = raw.get("publisher")
    if publisher not in (None, "null", "zmq"):
        raise ConfigError("--kv-events-config.publisher", publisher, "must be 'zmq' or 'null'")
    defaults = KVEventsSettings()
    return KVEventsSettings(
        enabled=bool(enabled) and publisher != "null",
        endpoint=typed("endpoint", str, defaults.endpoint),
        replay_endpoint=typed("replay_endpoint", str, None),
        buffer_steps=typed("buffer_steps", int, defaults.buffer_steps),
        hwm=typed("hwm", int, defaults.hwm),
        max_queue_size=typed("max_queue_size", int, defaults.max_queue_size),
        topic=typed("topic", str, defaults.topic),
    )


def model_context_length(model_path: Path) -> int:
    """The context length vLLM derives when ``--max-model-len`` is not given.

    Args:
        model_path: the model folder.

    Returns:
        ``max_position_embeddings`` from ``config.json``, else 2048.

    Raises:
        ConfigError: ``config.json`` exists but is not a JSON object with a sane value.
    """
    path = model_path / "config.json"
    if not path.is_file():
        return 2048
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError("--model", str(model_path), f"unreadable config.json: {exc}") from exc
    value = config.get("max_position_embeddings", 2048) if isinstance(config, dict) else None
    if type(value) is not int or value < 1 or not math.isfinite(value):
        raise ConfigError("--model", str(model_path), "config.json has no usable context length")
    return value


__all__ = [
    "DEFAULT_MAX_BATCHED_TOKENS",
    "DEFAULT_MAX_NUM_SEQS",
    "DEFAULT_NONE_HASH_SEED",
    "DEFAULT_NUM_BLOCKS",
    "VLLM_VERSION",
    "KVEventsSettings",
    "SimConfig",
    "build_parser",
    "model_context_length",
    "parse_args",
    "parse_kv_events_config",
]
