"""The model store against a loopback Hugging Face Hub mirror through huggingface_hub: fetch by
revision with LFS SHA-256 and git blob checks, resume a cut download, reject a corrupt file,
missing repositories and revisions. Nothing leaves the machine."""

from __future__ import annotations

import os

# huggingface_hub reads these once, when first imported (shared/TEST-SERVERS.md).
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ["NO_PROXY"] = "127.0.0.1"

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from fleet.agent.store import (  # noqa: E402
    ChecksumMismatch,
    SourceNotFound,
    SourceUnavailable,
    StoreConfig,
)
from fleet.agent.store.cachedir import cache_key  # noqa: E402

from .storeservers import HfMirror, model_files, running_store  # noqa: E402

MiB = 1024 * 1024


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HfMirror]:
    import huggingface_hub.constants

    # Whatever imported huggingface_hub first, it must not call the public hub.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    server = HfMirror()
    try:
        yield server
    finally:
        server.close()


def cfg(root: Path, mirror: HfMirror) -> StoreConfig:
    return StoreConfig(root=root, min_free_bytes=0, chunk_bytes=256 * 1024, hf_endpoint=mirror.url)


async def test_fetch_from_the_hub_verifies_every_file(mirror: HfMirror, tmp_path: Path) -> None:
    files = model_files(700_000) | {"sub/generation_config.json": b'{"top_p": 1}'}
    mirror.repos["org/chat"] = files
    async with running_store(cfg(tmp_path / "cache", mirror)) as store:
        path = await store.fetch("hf://org/chat@main")
        got = {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}
        assert got == files
        [model] = store.models()
        assert model.verification == "git-sha1: 3, sha256: 1"
        assert await store.fetch(f"hf://org/chat@{mirror.COMMIT}") != path  # another URI
    paths = {p for _, p, _ in mirror.faults.requests}
    assert paths <= {
        "/api/models/org/chat/revision/main",
        f"/api/models/org/chat/revision/{mirror.COMMIT}",
        f"/api/models/org/chat/tree/{mirror.COMMIT}",
    } | {f"/org/chat/resolve/{mirror.COMMIT}/{name}" for name in files}
    assert not (tmp_path / "hf-home").exists()  # no second copy in huggingface_hub's cache


async def test_cut_hub_download_resumes_with_a_range(mirror: HfMirror, tmp_path: Path) -> None:
    files = model_files(2 * MiB)
    mirror.repos["org/big"] = files
    cut = MiB + 777
    mirror.faults.cut_after["/model.safetensors"] = cut
    uri = "hf://org/big"
    async with running_store(cfg(tmp_path, mirror)) as store:
        with pytest.raises(SourceUnavailable):
            await store.fetch(uri)
    part = tmp_path / "partial" / cache_key(uri) / "parts" / "model.safetensors"
    done = part.stat().st_size
    assert 0 < done <= cut
    mirror.faults.cut_after.clear()
    async with running_store(cfg(tmp_path, mirror)) as store:
        path = await store.fetch(uri)
    assert (path / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert mirror.faults.gets("/model.safetensors") == ["", f"bytes={done}-"]


async def test_corrupt_hub_file_is_rejected(mirror: HfMirror, tmp_path: Path) -> None:
    files = model_files(50_000)
    mirror.repos["org/bad"] = files
    mirror.served["org/bad"] = {"tokenizer.json": b'{"version": "6.6"}'}  # same size, other bytes
    async with running_store(cfg(tmp_path, mirror)) as store:
        with pytest.raises(ChecksumMismatch, match="tokenizer.json: git blob"):
            await store.fetch("hf://org/bad")
        assert store.models() == ()
    assert list((tmp_path / "entries").iterdir()) == []
    assert list((tmp_path / "partial").iterdir()) == []


async def test_missing_repo_or_revision_is_not_found(mirror: HfMirror, tmp_path: Path) -> None:
    mirror.repos["org/chat"] = model_files(10)
    async with running_store(cfg(tmp_path, mirror)) as store:
        with pytest.raises(SourceNotFound, match="RepositoryNotFound"):
            await store.fetch("hf://org/nothing")
        with pytest.raises(SourceNotFound, match="RevisionNotFound"):
            await store.fetch("hf://org/chat@v9")
