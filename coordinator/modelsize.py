"""How big a model is, read from its files without loading a weight.

:func:`safetensors_bytes` reads only the header of each ``*.safetensors`` file: 8 bytes of
little-endian header length, then that many bytes of JSON mapping each tensor name to its
``dtype``, ``shape`` and ``data_offsets`` (``__metadata__`` aside). Each tensor's size is computed
from dtype and shape and checked against its byte range, and the byte ranges against the file's
size, so a truncated or corrupt file is rejected instead of under-counted. With a
``model.safetensors.index.json`` only the shards it names are read, and every tensor it maps must
be in its shard.

:func:`read_footprint` adds what the KV-cache estimate needs from ``config.json`` (layers, KV
heads, head size, ...). Both block on file reads: the service calls them off the event loop.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelFormatError

INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
#: Bits per element of each safetensors dtype.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
_CONFIG_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "half": 2, "float32": 4, "float": 4}


def _file_tensors(path: Path) -> dict[str, int]:
    """Tensor name -> bytes for one safetensors file, every range checked."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFormatError(str(path), "shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES:
                raise ModelFormatError(str(path), f"header length {length} is over the limit")
            raw = f.read(length)
            size = path.stat().st_size
    except OSError as exc:
        raise ModelFormatError(str(path), f"cannot read it: {exc}") from exc
    if len(raw) < length:
        raise ModelFormatError(str(path), f"header is {length} bytes but the file ends first")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(str(path), f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelFormatError(str(path), "header is not a JSON object")
    out: dict[str, int] = {}
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        out[name] = _tensor_bytes(path, name, info)
        end = max(end, info["data_offsets"][1])
    data = size - 8 - length
    if end != data:
        raise ModelFormatError(
            str(path), f"tensors end at byte {end} of the data but the data is {data} bytes"
        )
    return out


def _tensor_bytes(path: Path, name: str, info: Any) -> int:
    try:
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
    except (TypeError, KeyError, ValueError) as exc:
        raise ModelFormatError(str(path), f"tensor {name!r}: malformed entry {info!r}") from exc
    if dtype not in DTYPE_BITS:
        raise ModelFormatError(str(path), f"tensor {name!r}: unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ModelFormatError(str(path), f"tensor {name!r}: bad shape {shape!r}")
    nbytes = math.ceil(math.prod(shape) * DTYPE_BITS[dtype] / 8)
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
        raise ModelFormatError(str(path), f"tensor {name!r}: bad data_offsets {[begin, end]}")
    if end - begin != nbytes:
        raise ModelFormatError(
            str(path),
            f"tensor {name!r}: {dtype} {shape} is {nbytes} bytes but its range holds {end - begin}",
        )
    return nbytes


def safetensors_bytes(path: Path) -> int:
    """Total bytes of the weights in a safetensors file or a model folder.

    Args:
        path: one ``.safetensors`` file, or a folder: with ``model.safetensors.index.json`` its
            shards, else every ``*.safetensors`` file in it.

    Returns:
        The sum of every tensor's size (dtype × shape), headers not included.

    Raises:
        ModelFormatError: a file cannot be read, its header is malformed, a tensor's range
            disagrees with its dtype and shape, the file's size disagrees with the header, the
            index names a missing shard or tensor, or the folder holds no safetensors file.
    """
    if path.is_file():
        return sum(_file_tensors(path).values())
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelFormatError(str(index), f"not a safetensors index: {exc}") from exc
        total = 0
        found: set[str] = set()
        for shard in shards:
            tensors = _file_tensors(path / shard)
            total += sum(tensors.values())
            found.update(tensors)
            missing = sorted(n for n, s in weight_map.items() if s == shard and n not in tensors)
            if missing:
                raise ModelFormatError(
                    str(path / shard), f"the index maps {missing[0]!r} here but it is not"
                )
        return total
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(str(path), "no *.safetensors file")
    return sum(sum(_file_tensors(f).values()) for f in files)


@dataclass(frozen=True)
class ModelFootprint:
    """What placement needs to know about a model (0 where unknown).

    Attributes:
        weight_bytes: every weight, from the safetensors headers.
        num_layers: ``num_hidden_layers``.
        num_kv_heads: ``num_key_value_heads`` (``num_attention_heads`` without GQA).
        head_dim: ``head_dim``, else ``hidden_size / num_attention_heads``.
        hidden_size: ``hidden_size``.
        intermediate_size: ``intermediate_size``.
        vocab_size: ``vocab_size``.
        max_position_embeddings: vLLM's default ``--max-model-len``.
        dtype_bytes: bytes per activation/KV element (``torch_dtype``; 2 when unknown).
    """

    weight_bytes: int
    num_layers: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    hidden_size: int = 0
    intermediate_size: int = 0
    vocab_size: int = 0
    max_position_embeddings: int = 0
    dtype_bytes: int = 2

    def kv_bytes_per_token(self, tp: int, kv_dtype_bytes: int | None = None) -> int:
        """KV-cache bytes one token takes on one GPU of a ``tp``-wide group: keys and values of
        every layer, ``max(1, kv_heads // tp)`` heads per GPU (vLLM replicates KV heads when
        there are fewer than GPUs)."""
        heads = max(1, self.num_kv_heads // tp) if self.num_kv_heads else 0
        size = kv_dtype_bytes or self.dtype_bytes
        return 2 * self.num_layers * heads * self.head_dim * size


def footprint_from_config(weight_bytes: int, config: dict[str, Any]) -> ModelFootprint:
    """Build a footprint from a Hugging Face ``config.json`` (its ``text_config`` if nested)."""
    cfg = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    assert isinstance(cfg, dict)

    def num(key: str, default: int = 0) -> int:
        value = cfg.get(key, config.get(key, default))
        return value if isinstance(value, int) and not isinstance(value, bool) else default

    heads = num("num_attention_heads")
    hidden = num("hidden_size")
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or config.get("torch_dtype") or ""
    return ModelFootprint(
        weight_bytes=weight_bytes,
        num_layers=num("num_hidden_layers"),
        num_kv_heads=num("num_key_value_heads", heads),
        head_dim=num("head_dim") or (hidden // heads if heads else 0),
        hidden_size=hidden,
        intermediate_size=num("intermediate_size"),
        vocab_size=num("vocab_size"),
        max_position_embeddings=num("max_position_embeddings"),
        dtype_bytes=_CONFIG_DTYPE_BYTES.get(str(dtype), 2),
    )


def read_footprint(folder: Path) -> ModelFootprint:
    """A local model folder's footprint: safetensors weights, plus ``config.json`` if present.

    Raises:
        ModelFormatError: as :func:`safetensors_bytes`, or ``config.json`` is not a JSON object.
    """
    weights = safetensors_bytes(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        return ModelFootprint(weight_bytes=weights)
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFormatError(str(config_path), f"not JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelFormatError(str(config_path), "not a JSON object")
    return footprint_from_config(weights, config)


__all__ = [
    "DTYPE_BITS",
    "INDEX_FILE",
    "ModelFootprint",
    "footprint_from_config",
    "read_footprint",
    "safetensors_bytes",
]
