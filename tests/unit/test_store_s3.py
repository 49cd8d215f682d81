"""The model store against moto's S3 server on loopback: fetch with SHA-256 checksums, resume
a cut GET with a ranged one, missing buckets and prefixes."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from fleet.agent.store import SourceNotFound, SourceUnavailable, StoreConfig
from fleet.agent.store.cachedir import cache_key

from .storeservers import RecordingMotoServer, model_files, running_store

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def moto_server() -> Iterator[RecordingMotoServer]:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "NO_PROXY": "127.0.0.1",
        }.items():
            mp.setenv(key, value)
        server = RecordingMotoServer()
        server.start()
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def s3(moto_server: RecordingMotoServer) -> Iterator[Any]:
    httpx.post(f"{moto_server.url}/moto-api/reset").raise_for_status()
    moto_server.faults.requests.clear()
    moto_server.faults.cut_after.clear()
    yield boto3.client("s3", endpoint_url=moto_server.url, region_name="us-east-1")


def upload(s3: Any, bucket: str, prefix: str, files: dict[str, bytes], *, sha: bool) -> None:
    s3.create_bucket(Bucket=bucket)
    for path, data in files.items():
        extra = {"ChecksumAlgorithm": "SHA256"} if sha else {}
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{path}", Body=data, **extra)


def cfg(root: Path, server: RecordingMotoServer) -> StoreConfig:
    return StoreConfig(
        root=root, min_free_bytes=0, chunk_bytes=256 * 1024, s3_endpoint_url=server.url
    )


async def test_fetch_from_s3_verifies_sha256(
    s3: Any, moto_server: RecordingMotoServer, tmp_path: Path
) -> None:
    files = model_files(600_000)
    upload(s3, "models", "chat/v1", files, sha=True)
    s3.put_object(Bucket="models", Key="chat/v1-other/config.json", Body=b"{}")  # not ours
    head = s3.head_object(Bucket="models", Key="chat/v1/config.json", ChecksumMode="ENABLED")
    assert (
        base64.b64decode(head["ChecksumSHA256"]).hex()
        == hashlib.sha256(files["config.json"]).hexdigest()
    )
    async with running_store(cfg(tmp_path, moto_server)) as store:
        path = await store.fetch("s3://models/chat/v1")
        assert {p.name: p.read_bytes() for p in path.iterdir()} == files
        [model] = store.models()
        assert model.verification == "sha256: 3"


async def test_objects_without_checksums_are_checked_by_size(
    s3: Any, moto_server: RecordingMotoServer, tmp_path: Path
) -> None:
    upload(s3, "plain", "m", model_files(1000), sha=False)
    async with running_store(cfg(tmp_path, moto_server)) as store:
        await store.fetch("s3://plain/m/")
        [model] = store.models()
        assert model.verification == "size: 3"


async def test_cut_s3_download_resumes_with_a_ranged_get(
    s3: Any, moto_server: RecordingMotoServer, tmp_path: Path
) -> None:
    files = model_files(2 * MiB)
    upload(s3, "models", "big", files, sha=True)
    moto_server.faults.cut_after["/big/model.safetensors"] = MiB
    uri = "s3://models/big"
    async with running_store(cfg(tmp_path, moto_server)) as store:
        with pytest.raises(SourceUnavailable):
            await store.fetch(uri)
    part = tmp_path / "partial" / cache_key(uri) / "parts" / "model.safetensors"
    done = part.stat().st_size
    assert 0 < done <= MiB
    async with running_store(cfg(tmp_path, moto_server)) as store:
        path = await store.fetch(uri)
    assert (path / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert moto_server.faults.gets("/big/model.safetensors") == ["", f"bytes={done}-"]
    assert moto_server.faults.gets("/big/config.json") == [""]


async def test_missing_bucket_or_prefix_is_not_found(
    s3: Any, moto_server: RecordingMotoServer, tmp_path: Path
) -> None:
    upload(s3, "models", "chat", model_files(10), sha=True)
    async with running_store(cfg(tmp_path, moto_server)) as store:
        with pytest.raises(SourceNotFound, match="NoSuchBucket"):
            await store.fetch("s3://no-such-bucket/chat")
        with pytest.raises(SourceNotFound, match="no objects under"):
            await store.fetch("s3://models/other")
    assert list((tmp_path / "entries").iterdir()) == []
    assert list((tmp_path / "partial").iterdir()) == []
