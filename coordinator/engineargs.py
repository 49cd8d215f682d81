"""The vLLM engine arguments of a deployment: the ones placement needs, and the ones Fleet owns.

A FleetModel's ``spec.engineArgs`` is passed to ``vllm serve`` as given, except that Fleet
itself sets the flags in :data:`FLEET_OWNED_FLAGS` (a deployment setting one is rejected, with the
spec field to use instead). The flags that decide how much GPU memory an engine takes are read
into :class:`EngineArgs`, with vLLM's own syntax: ``--flag=value`` or ``--flag value``,
underscores or dashes, and the human-readable integers vLLM accepts (``1k`` = 1000, ``1K`` = 1024,
``auto`` for ``--max-model-len``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from fleet.protocol.errors import ConfigError

#: Flags Fleet sets for every engine -> what to use instead.
FLEET_OWNED_FLAGS: dict[str, str] = {
    "--model": "set spec.source",
    "--served-model-name": "set spec.servedModelNames",
    "--tensor-parallel-size": "set spec.tensorParallelSize",
    "-tp": "set spec.tensorParallelSize",
    "--pipeline-parallel-size": "Fleet places tensor-parallel groups only",
    "-pp": "Fleet places tensor-parallel groups only",
    "--data-parallel-size": "set spec.replicas",
    "-dp": "set spec.replicas",
    "--host": "Fleet binds each engine",
    "--port": "Fleet binds each engine",
    "--headless": "Fleet launches tensor-parallel ranks",
    "--nnodes": "Fleet launches tensor-parallel ranks",
    "--node-rank": "Fleet launches tensor-parallel ranks",
    "--master-addr": "Fleet launches tensor-parallel ranks",
    "--master-port": "Fleet launches tensor-parallel ranks",
    "--kv-events-config": "Fleet relays every engine's KV events",
}

DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
KV_CACHE_DTYPES = (
    "auto",
    "float16",
    "bfloat16",
    "fp8",
    "fp8_e4m3",
    "fp8_e5m2",
    "fp8_inc",
    "fp8_ds_mla",
)

_HUMAN = re.compile(r"(\d+(?:\.\d+)?)([kKmMgGtT])")
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def human_int(text: str) -> int:
    """Parse an integer the way vLLM's ``human_readable_int`` does.

    Args:
        text: ``"2048"``, ``"1k"`` (1000), ``"25.6k"`` (25600), ``"1K"`` (1024); decimals are
            not allowed with the binary (upper-case) suffixes.

    Returns:
        The integer.

    Raises:
        ValueError: the text is not such a number.
    """
    text = text.strip()
    match = _HUMAN.fullmatch(text)
    if match is None:
        return int(text)
    number, suffix = match.groups()
    if suffix in _DECIMAL:
        return int(float(number) * _DECIMAL[suffix])
    return int(number) * _BINARY[suffix]


@dataclass(frozen=True)
class EngineArgs:
    """The memory-relevant engine arguments; None where the deployment leaves vLLM's default.

    Attributes:
        gpu_memory_utilization: ``--gpu-memory-utilization``, in (0, 1].
        max_model_len: ``--max-model-len``; -1 for ``auto`` (vLLM fits it to memory).
        kv_cache_memory_bytes: ``--kv-cache-memory-bytes``.
        max_num_batched_tokens: ``--max-num-batched-tokens``.
        max_num_seqs: ``--max-num-seqs``.
        block_size: ``--block-size``.
        dtype: ``--dtype``.
        kv_cache_dtype: ``--kv-cache-dtype``.
        enforce_eager: ``--enforce-eager`` (no CUDA graphs, so no graph memory).
    """

    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    kv_cache_memory_bytes: int | None = None
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    block_size: int | None = None
    dtype: str | None = None
    kv_cache_dtype: str | None = None
    enforce_eager: bool = False

    @classmethod
    def parse(cls, args: tuple[str, ...]) -> EngineArgs:
        """Read the memory-relevant flags.

        Args:
            args: the engine arguments, as ``spec.engineArgs`` gives them.

        Returns:
            The flags found; the others stay None.

        Raises:
            ConfigError: the first problem :func:`check_engine_args` finds (key
                ``engineArgs[i]``).
        """
        problems = check_engine_args(args)
        if problems:
            where, reason = problems[0]
            raise ConfigError(f"engineArgs{where}", args, reason)
        values: dict[str, object] = {}
        for _, flag, value in _flags(args):
            if flag in ("--enforce-eager", "--no-enforce-eager"):
                values["enforce_eager"] = flag == "--enforce-eager"
            parser = _VALUED.get(flag)
            if parser is not None and value is not None:
                values[parser[0]] = parser[1](value)
        return cls(**values)  # type: ignore[arg-type]


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value <= 1):
        raise ValueError("must be a number in (0, 1]")
    return value


def _positive(text: str) -> int:
    try:
        value = human_int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError("must be an integer >= 1")
    return value


def _model_len(text: str) -> int:
    if text.strip().lower() == "auto" or text.strip() == "-1":
        return -1
    try:
        return _positive(text)
    except ValueError:
        raise ValueError("must be an integer >= 1 or auto") from None


def _choice(choices: tuple[str, ...]) -> Callable[[str], object]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text

    return parse


#: Flags read into :class:`EngineArgs`: flag -> (attribute, parser raising ValueError).
_VALUED: dict[str, tuple[str, Callable[[str], object]]] = {
    "--gpu-memory-utilization": ("gpu_memory_utilization", _fraction),
    "--max-model-len": ("max_model_len", _model_len),
    "--kv-cache-memory-bytes": ("kv_cache_memory_bytes", _positive),
    "--max-num-batched-tokens": ("max_num_batched_tokens", _positive),
    "--max-num-seqs": ("max_num_seqs", _positive),
    "--block-size": ("block_size", _positive),
    "--dtype": ("dtype", _choice(DTYPES)),
    "--kv-cache-dtype": ("kv_cache_dtype", _choice(KV_CACHE_DTYPES)),
}


def _flags(args: tuple[str, ...]) -> list[tuple[int, str, str | None]]:
    """(index, normalized flag, value or None) for each flag; values follow ``=`` or come next."""
    out: list[tuple[int, str, str | None]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-") or _is_number(arg):
            i += 1
            continue
        name, eq, value = arg.partition("=")
        if name.startswith("--"):
            name = "--" + name[2:].replace("_", "-")
        if eq:
            out.append((i, name, value))
        elif i + 1 < len(args) and (not args[i + 1].startswith("-") or _is_number(args[i + 1])):
            out.append((i, name, args[i + 1]))
            i += 1
        else:
            out.append((i, name, None))
        i += 1
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_engine_args(args: tuple[str, ...]) -> list[tuple[str, str]]:
    """Every problem in a deployment's engine arguments.

    Args:
        args: the engine arguments.

    Returns:
        ``("[i]", reason)`` per problem, ``i`` the index of the flag at fault; empty when fine.
    """
    problems: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    for i, flag, value in _flags(args):
        if flag in FLEET_OWNED_FLAGS:
            problems.append((f"[{i}]", f"{flag} is set by Fleet: {FLEET_OWNED_FLAGS[flag]}"))
            continue
        parser = _VALUED.get(flag)
        if flag == KV_TRANSFER_FLAG:
            parser = (flag, _kv_transfer_config)
        if parser is None:
            continue
        if flag in seen:
            problems.append((f"[{i}]", f"{flag} is given twice (first at [{seen[flag]}])"))
            continue
        seen[flag] = i
        if value is None:
            problems.append((f"[{i}]", f"{flag} needs a value"))
            continue
        try:
            parser[1](value)
        except ValueError as exc:
            problems.append((f"[{i}]", f"{flag} {exc}, got {value!r}"))
    return problems


KV_TRANSFER_FLAG = "--kv-transfer-config"
#: An engine's role -> the ``kv_role`` Fleet gives its KV connector when the deployment sets none.
KV_ROLES = {"prefill": "kv_producer", "decode": "kv_consumer", "both": "kv_both"}


def _kv_transfer_config(text: str) -> dict[str, object]:
    try:
        config = json.loads(text)
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise ValueError("must be a JSON object")
    role = config.get("kv_role")
    if role is not None and role not in KV_ROLES.values():
        raise ValueError(f"kv_role must be one of {', '.join(KV_ROLES.values())}")
    return config


def with_kv_role(args: tuple[str, ...], role: str) -> tuple[str, ...]:
    """The engine arguments of one engine: ``kv_role`` set from its role where unset.

    A ``--kv-transfer-config`` JSON without ``kv_role`` gets ``kv_producer`` on a prefill
    engine, ``kv_consumer`` on a decode engine and ``kv_both`` on one that does both; an
    explicit ``kv_role`` is kept, as is every other argument.

    Args:
        args: the deployment's engine arguments (checked by :func:`check_engine_args`).
        role: the engine's role, a key of :data:`KV_ROLES`.

    Returns:
        The arguments to launch the engine with.
    """
    out = list(args)
    for i, flag, value in _flags(args):
        if flag != KV_TRANSFER_FLAG or value is None:
            continue
        try:
            config = _kv_transfer_config(value)
        except ValueError:
            continue  # check_engine_args reports it
        if "kv_role" in config:
            continue
        text = json.dumps({**config, "kv_role": KV_ROLES[role]}, separators=(",", ":"))
        if "=" in args[i]:
            out[i] = f"{args[i].partition('=')[0]}={text}"
        else:
            out[i + 1] = text
    return tuple(out)


__all__ = [
    "DTYPES",
    "FLEET_OWNED_FLAGS",
    "KV_CACHE_DTYPES",
    "KV_ROLES",
    "KV_TRANSFER_FLAG",
    "EngineArgs",
    "check_engine_args",
    "human_int",
    "with_kv_role",
]
