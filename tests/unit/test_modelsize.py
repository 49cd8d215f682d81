"""Model sizes from file headers (fleet.coordinator.modelsize): safetensors files written by the
real `safetensors` library and by hand, shards with an index, corrupt files, config.json."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from fleet.coordinator.errors import ModelFormatError
from fleet.coordinator.modelsize import (
    INDEX_FILE,
    ModelFootprint,
    footprint_from_config,
    read_footprint,
    safetensors_bytes,
)


def raw_file(
    path: Path,
    tensors: dict[str, tuple[str, list[int], int]],
    *,
    data: int = -1,
    pad: int = 0,
    metadata: bool = True,
) -> None:
    """Write a safetensors file by hand: name -> (dtype, shape, byte length)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}} if metadata else {}
    offset = 0
    for name, (dtype, shape, length) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + length]}
        offset += length
    blob = json.dumps(header).encode() + b" " * pad
    body = bytes(offset if data < 0 else data)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + body)


def test_a_file_written_by_the_safetensors_library(tmp_path: Path) -> None:
    tensors = {
        "embed.weight": np.zeros((1000, 64), dtype=np.float16),
        "layer.0.w": np.ones((64, 256), dtype=np.float32),
        "positions": np.arange(17, dtype=np.int64),
        "mask": np.zeros((3, 5), dtype=np.uint8),
        "scalar": np.array(1.5, dtype=np.float64),
        "empty": np.zeros((0, 8), dtype=np.float32),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "np"})
    expected = sum(t.nbytes for t in tensors.values())
    assert safetensors_bytes(path) == expected
    (header_len,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert expected == path.stat().st_size - 8 - header_len  # what the reader verifies
    assert safetensors_bytes(tmp_path) == expected  # the folder, without an index


def test_sharded_model_with_an_index(tmp_path: Path) -> None:
    a = {"a.w": np.zeros((128, 128), dtype=np.float16), "a.b": np.zeros(128, dtype=np.float16)}
    b = {"b.w": np.zeros((128, 64), dtype=np.float32)}
    save_file(a, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(b, str(tmp_path / "model-00002-of-00002.safetensors"))
    save_file({"x": np.zeros(10**5, dtype=np.float32)}, str(tmp_path / "stray.safetensors"))
    weight_map = {
        "a.w": "model-00001-of-00002.safetensors",
        "a.b": "model-00001-of-00002.safetensors",
        "b.w": "model-00002-of-00002.safetensors",
    }
    (tmp_path / INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    )
    assert safetensors_bytes(tmp_path) == 128 * 128 * 2 + 128 * 2 + 128 * 64 * 4  # not stray

    weight_map["c.w"] = "model-00002-of-00002.safetensors"
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelFormatError, match="the index maps 'c.w' here but it is not"):
        safetensors_bytes(tmp_path)
    weight_map["c.w"] = "model-00003-of-00002.safetensors"
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelFormatError, match="00003-of-00002.safetensors: cannot read it"):
        safetensors_bytes(tmp_path)
    (tmp_path / INDEX_FILE).write_text("[]")
    with pytest.raises(ModelFormatError, match="not a safetensors index"):
        safetensors_bytes(tmp_path)


def test_dtypes_the_numpy_writer_lacks(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    raw_file(
        path,
        {
            "w": ("BF16", [4, 8], 64),
            "q": ("F8_E4M3", [16], 16),
            "f4": ("F4", [3, 3], 5),
            "b": ("BOOL", [2], 2),
        },
        pad=5,
        metadata=False,
    )
    assert safetensors_bytes(path) == 64 + 16 + 5 + 2


@pytest.mark.parametrize(
    ("tensors", "data", "message"),
    [
        (
            {"w": ("F16", [4, 4], 30)},
            -1,
            "tensor 'w': F16 [4, 4] is 32 bytes but its range holds 30",
        ),
        (
            {"w": ("F16", [4, 4], 32)},
            16,
            "tensors end at byte 32 of the data but the data is 16 bytes",
        ),
        (
            {"w": ("F16", [4, 4], 32)},
            40,
            "tensors end at byte 32 of the data but the data is 40 bytes",
        ),
        ({"w": ("Q4", [4], 2)}, -1, "tensor 'w': unknown dtype 'Q4'"),
        ({"w": ("F32", [-1], 4)}, -1, "tensor 'w': bad shape [-1]"),
    ],
)
def test_corrupt_files_are_rejected(
    tmp_path: Path, tensors: dict[str, tuple[str, list[int], int]], data: int, message: str
) -> None:
    path = tmp_path / "bad.safetensors"
    raw_file(path, tensors, data=data)
    with pytest.raises(ModelFormatError) as info:
        safetensors_bytes(path)
    assert str(info.value) == f"{path}: {message}"


def test_truncated_and_garbage_headers(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(ModelFormatError, match="shorter than the 8-byte header length"):
        safetensors_bytes(path)
    path.write_bytes(struct.pack("<Q", 100) + b"{}")
    with pytest.raises(ModelFormatError, match="header is 100 bytes but the file ends first"):
        safetensors_bytes(path)
    path.write_bytes(struct.pack("<Q", 3) + b"{x}")
    with pytest.raises(ModelFormatError, match="header is not JSON"):
        safetensors_bytes(path)
    path.write_bytes(struct.pack("<Q", 2**40))
    with pytest.raises(ModelFormatError, match="over the limit"):
        safetensors_bytes(path)
    with pytest.raises(ModelFormatError, match="no \\*.safetensors file"):
        safetensors_bytes(tmp_path / "nothing-here")


LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "torch_dtype": "bfloat16",
}


def test_footprint_from_config() -> None:
    fp = footprint_from_config(16 << 30, LLAMA_8B)
    assert fp == ModelFootprint(
        weight_bytes=16 << 30,
        num_layers=32,
        num_kv_heads=8,
        head_dim=128,
        hidden_size=4096,
        intermediate_size=14336,
        vocab_size=128256,
        max_position_embeddings=131072,
        dtype_bytes=2,
    )
    # 2 (K and V) x 32 layers x 8 heads x 128 x 2 bytes = 128 KiB per token, split over TP ranks
    assert fp.kv_bytes_per_token(1) == 131072
    assert fp.kv_bytes_per_token(2) == 65536
    assert fp.kv_bytes_per_token(16) == 16384  # fewer KV heads than GPUs: one replicated head
    assert fp.kv_bytes_per_token(1, kv_dtype_bytes=1) == 65536
    nested = footprint_from_config(
        1, {"text_config": dict(LLAMA_8B, torch_dtype="float32"), "vision_config": {}}
    )
    assert (nested.num_layers, nested.dtype_bytes) == (32, 4)
    assert footprint_from_config(1, {}).kv_bytes_per_token(1) == 0


def test_read_footprint_of_a_model_folder(tmp_path: Path) -> None:
    save_file({"w": np.zeros((64, 64), dtype=np.float32)}, str(tmp_path / "model.safetensors"))
    assert read_footprint(tmp_path) == ModelFootprint(weight_bytes=64 * 64 * 4)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    assert read_footprint(tmp_path).num_kv_heads == 8
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(ModelFormatError, match="not a JSON object"):
        read_footprint(tmp_path)


def test_the_demo_model(demo_model: Path) -> None:
    """The demo model Fleet builds: the header sum equals the data on disk."""
    total = safetensors_bytes(demo_model)
    on_disk = 0
    for f in demo_model.glob("*.safetensors"):
        (n,) = struct.unpack("<Q", f.read_bytes()[:8])
        on_disk += f.stat().st_size - 8 - n
    assert total == on_disk > 0
