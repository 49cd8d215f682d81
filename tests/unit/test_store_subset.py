"""The store's SubsetFetcher against the loopback sources of the store tests (a Fleet manifest
over HTTP, a Hugging Face Hub mirror, moto's S3): only the chosen files are downloaded, each is
verified, a bad file or a cut transfer publishes nothing, the next attempt succeeds, and the
subset never shows up as a model in a model store sharing its folder."""

from __future__ import annotations

import os

# huggingface_hub reads these once, when first imported (shared/TEST-SERVERS.md).
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ["NO_PROXY"] = "127.0.0.1"

import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from collections.abc import AsyncIterator, Iterator  # noqa: E402
from contextlib import asynccontextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import boto3  # noqa: E402
import pytest  # noqa: E402
import trio  # noqa: E402

from fleet.agent.store import (  # noqa: E402
    ChecksumMismatch,
    NotAModel,
    SourceNotFound,
    SourceUnavailable,
    StoreConfig,
    SubsetFetcher,
)
from fleet.protocol.vllm_tokenizer import TOKENIZER_FILES  # noqa: E402

from .storeservers import (  # noqa: E402
    FileServer,
    HfMirror,
    RecordingMotoServer,
    manifest_doc,
    model_files,
    running_store,
)

TOKENIZER = {
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
    "tokenizer_config.json": b'{"bos_token": "<s>"}',
    "chat_template.jinja": b"{% for m in messages %}{{ m.content }}{% endfor %}",
    "generation_config.json": b'{"top_p": 0.9}',
}


def files(weights_bytes: int = 300_000) -> dict[str, bytes]:
    """A model folder: config.json, tokenizer files, weights and a README nobody needs."""
    return model_files(weights_bytes) | TOKENIZER | {"README.md": b"# a model\n"}


def wanted(all_files: dict[str, bytes]) -> dict[str, bytes]:
    return {p: d for p, d in all_files.items() if p not in ("model.safetensors", "README.md")}


def cfg(root: Path, **kwargs: Any) -> StoreConfig:
    return StoreConfig(root=root, min_free_bytes=0, chunk_bytes=64 * 1024, **kwargs)


@asynccontextmanager
async def running(fetcher: SubsetFetcher) -> AsyncIterator[SubsetFetcher]:
    async with trio.open_nursery() as nursery:
        await nursery.start(fetcher.run)
        yield fetcher
        nursery.cancel_scope.cancel()


def contents(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.name != ".fleet-subset.json"
    }


@pytest.fixture
def server() -> Iterator[FileServer]:
    s = FileServer()
    try:
        yield s
    finally:
        s.close()


async def test_only_the_tokenizer_files_come_over_http(server: FileServer, tmp_path: Path) -> None:
    server.folders["m"] = files()
    uri = f"{server.url}/m/"
    fetcher = SubsetFetcher(cfg(tmp_path), TOKENIZER_FILES)
    async with running(fetcher):
        folder = await fetcher.fetch(uri)
        assert contents(folder) == wanted(server.folders["m"])
        assert not server.faults.gets("model.safetensors")  # never the weights
        assert not server.faults.gets("README.md")
        record = json.loads((folder / ".fleet-subset.json").read_text())
        assert record["uri"] == uri
        assert {f["path"] for f in record["manifest"]["files"]} == set(wanted(server.folders["m"]))
        assert all(len(f["sha256"]) == 64 for f in record["manifest"]["files"])
        requests = len(server.faults.requests)
        assert await fetcher.fetch(uri) == folder  # from disk: the source is not asked again
        assert len(server.faults.requests) == requests
    assert folder.parent == tmp_path / "subsets"
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no partial folder left


async def test_a_wrong_checksum_publishes_nothing(server: FileServer, tmp_path: Path) -> None:
    server.folders["m"] = files()
    doc = manifest_doc(server.folders["m"])
    for entry in doc["files"]:
        if entry["path"] == "tokenizer.json":
            entry["sha256"] = hashlib.sha256(b"something else").hexdigest()
    server.manifests["m"] = doc
    uri = f"{server.url}/m/"
    fetcher = SubsetFetcher(cfg(tmp_path), TOKENIZER_FILES)
    async with running(fetcher):
        with pytest.raises(ChecksumMismatch, match="tokenizer.json: sha256"):
            await fetcher.fetch(uri)
        assert list((tmp_path / "subsets").iterdir()) == []  # neither the subset nor a partial
        del server.manifests["m"]  # the operator fixed the manifest
        assert contents(await fetcher.fetch(uri)) == wanted(server.folders["m"])


async def test_a_cut_transfer_then_a_source_that_is_down_then_back(
    server: FileServer, tmp_path: Path
) -> None:
    server.folders["m"] = files()
    server.faults.cut_after["/tokenizer.json"] = 10
    uri = f"{server.url}/m/"
    fetcher = SubsetFetcher(cfg(tmp_path), TOKENIZER_FILES)
    async with running(fetcher):
        with pytest.raises(SourceUnavailable, match="tokenizer.json"):
            await fetcher.fetch(uri)
        assert not fetcher.path_of(uri).exists()
        down = f"http://127.0.0.1:{_closed_port()}/m/"
        with pytest.raises(SourceUnavailable):
            await fetcher.fetch(down)
        server.faults.cut_after.clear()
        assert contents(await fetcher.fetch(uri)) == wanted(server.folders["m"])
    assert fetcher.delay_s(1) <= fetcher.delay_s(3) <= fetcher.cfg.retry.max_s


async def test_concurrent_fetches_of_one_source_download_once(
    server: FileServer, tmp_path: Path
) -> None:
    server.folders["m"] = files()
    uri = f"{server.url}/m/"
    fetcher = SubsetFetcher(cfg(tmp_path), TOKENIZER_FILES)
    got: list[Path] = []

    async def fetch() -> None:
        got.append(await fetcher.fetch(uri))

    async with running(fetcher):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(fetch)
    assert len(set(got)) == 1 and len(got) == 3
    assert len(server.faults.gets("/m/tokenizer.json")) == 1


async def test_a_dead_process_partial_folder_is_cleared(server: FileServer, tmp_path: Path) -> None:
    server.folders["m"] = files()
    uri = f"{server.url}/m/"
    fetcher = SubsetFetcher(cfg(tmp_path), TOKENIZER_FILES)
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-c", "import os; print(os.getpid())"], capture_stdout=True
        )
    dead = done.stdout.decode().strip()  # a process that has exited
    leftover = tmp_path / "subsets" / f".partial-{fetcher.path_of(uri).name}-{dead}"
    (leftover / "parts").mkdir(parents=True)
    (leftover / "parts" / "tokenizer.json").write_bytes(b"half")
    async with running(fetcher):
        await fetcher.fetch(uri)
    assert not leftover.exists()


async def test_local_sources_and_sources_without_tokenizer_files(
    server: FileServer, tmp_path: Path
) -> None:
    server.folders["weights"] = {"model.safetensors": b"\0" * 100, "README.md": b"hi"}
    fetcher = SubsetFetcher(cfg(tmp_path), TOKENIZER_FILES)
    async with running(fetcher):
        with pytest.raises(SourceNotFound, match="local source"):
            await fetcher.fetch(str(tmp_path))
        with pytest.raises(NotAModel, match="no file matches"):
            await fetcher.fetch(f"{server.url}/weights/")
        with pytest.raises(SourceNotFound, match="404"):
            await fetcher.fetch(f"{server.url}/nothing/")


async def test_a_model_store_in_the_same_folder_never_sees_the_subset(
    server: FileServer, tmp_path: Path
) -> None:
    server.folders["m"] = files()
    uri = f"{server.url}/m/"
    fetcher = SubsetFetcher(cfg(tmp_path), TOKENIZER_FILES)
    async with running(fetcher):
        subset = await fetcher.fetch(uri)
    async with running_store(cfg(tmp_path)) as store:
        assert store.models() == ()  # the tokenizer-only folder is no cached model
        model = await store.fetch(uri)
        assert contents(model) == server.folders["m"]  # weights included
    assert len(server.faults.gets("model.safetensors")) == 1
    assert contents(subset) == wanted(server.folders["m"])  # the store left it alone


async def test_from_a_hub_mirror_verified_by_git_blob_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    # Building the demo model first (another test's fixture) imports the hub offline.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    mirror = HfMirror()
    try:
        mirror.repos["org/chat"] = files()
        fetcher = SubsetFetcher(cfg(tmp_path / "cache", hf_endpoint=mirror.url), TOKENIZER_FILES)
        async with running(fetcher):
            folder = await fetcher.fetch("hf://org/chat@main")
            assert contents(folder) == wanted(mirror.repos["org/chat"])
            record = json.loads((folder / ".fleet-subset.json").read_text())
            assert all(len(f["git_sha1"]) == 40 for f in record["manifest"]["files"])
            assert not mirror.faults.gets("model.safetensors")
            mirror.served["org/chat"] = {"tokenizer_config.json": b'{"bos_token": "<x>"}'}
            with pytest.raises(ChecksumMismatch, match="git blob"):
                await fetcher.fetch("hf://org/chat@" + mirror.COMMIT)  # another URI
    finally:
        mirror.close()


async def test_from_s3_without_the_weights(tmp_path: Path) -> None:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            mp.setenv(key, value)
        server = RecordingMotoServer()
        server.start()
        try:
            s3 = boto3.client("s3", endpoint_url=server.url, region_name="us-east-1")
            s3.create_bucket(Bucket="models")
            for path, data in files().items():
                s3.put_object(
                    Bucket="models", Key=f"chat/{path}", Body=data, ChecksumAlgorithm="SHA256"
                )
            fetcher = SubsetFetcher(cfg(tmp_path, s3_endpoint_url=server.url), TOKENIZER_FILES)
            async with running(fetcher):
                folder = await fetcher.fetch("s3://models/chat")
            assert contents(folder) == wanted(files())
            assert not server.faults.gets("model.safetensors")
        finally:
            server.stop()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
