"""The model store against a real HTTP file server on loopback: fetch, resume after a cut,
reject corrupt files, share one download, evict by LRU within the budget, cancel."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from fleet.agent.store import (
    ChecksumMismatch,
    NoSpace,
    NotAModel,
    SourceNotFound,
    SourceUnavailable,
    StoreConfig,
)
from fleet.agent.store.cachedir import cache_key

from .storeservers import FileServer, manifest_doc, model_files, running_store

MiB = 1024 * 1024


@pytest.fixture
def server() -> Iterator[FileServer]:
    srv = FileServer()
    try:
        yield srv
    finally:
        srv.close()


def cfg(root: Path, **kwargs: object) -> StoreConfig:
    return StoreConfig(root=root, min_free_bytes=0, chunk_bytes=64 * 1024, **kwargs)  # type: ignore[arg-type]


def on_disk(root: Path) -> dict[str, list[str]]:
    return {d: sorted(p.name for p in (root / d).iterdir()) for d in ("entries", "partial")}


async def test_fetch_verifies_and_reuses_the_cache(server: FileServer, tmp_path: Path) -> None:
    files = model_files(300_000)
    server.folders["m"] = files
    uri = f"{server.url}/m/"
    async with running_store(cfg(tmp_path)) as store:
        path = await store.fetch(uri)
        assert {p.name: p.read_bytes() for p in path.iterdir()} == files
        assert await store.fetch(uri) == path  # a hit: nothing asked of the server again
        [model] = store.models()
        assert (model.uri, model.size_bytes) == (uri, sum(map(len, files.values())))
        assert model.verification == "sha256: 3"
    assert len(server.faults.requests) == 4  # the manifest and three files, once
    assert on_disk(tmp_path) == {"entries": [cache_key(uri)], "partial": []}
    async with running_store(cfg(tmp_path)) as store:  # a restarted agent finds it
        assert await store.fetch(uri) == path
    assert len(server.faults.requests) == 4


async def test_a_manifest_url_names_files_beside_it(server: FileServer, tmp_path: Path) -> None:
    server.folders["m"] = model_files(1000)
    async with running_store(cfg(tmp_path)) as store:
        path = await store.fetch(f"{server.url}/m/fleet-manifest.json")
    assert (path / "config.json").exists()


async def test_interrupted_download_resumes_with_a_range(
    server: FileServer, tmp_path: Path
) -> None:
    files = model_files(3 * MiB)
    server.folders["m"] = files
    cut = MiB + 12_345
    server.faults.cut_after["/model.safetensors"] = cut
    uri = f"{server.url}/m"
    async with running_store(cfg(tmp_path)) as store:
        with pytest.raises(SourceUnavailable) as info:
            await store.fetch(uri)
        assert "model.safetensors" in info.value.reason or "GET" in info.value.reason
        assert store.models() == ()
        [failed] = store.progress()
        assert failed.state == "failed" and failed.error == info.value.reason
    key = cache_key(uri)
    assert on_disk(tmp_path) == {"entries": [], "partial": [key]}
    part = tmp_path / "partial" / key / "parts" / "model.safetensors"
    assert part.stat().st_size == cut
    server.faults.cut_after.clear()
    async with running_store(cfg(tmp_path)) as store:  # the next attempt, after a restart
        path = await store.fetch(uri)
        assert store.progress() == ()
    assert (path / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert server.faults.gets("/model.safetensors") == ["", f"bytes={cut}-"]
    assert server.faults.gets("/config.json") == [""]  # done the first time: not again
    assert on_disk(tmp_path) == {"entries": [key], "partial": []}


async def test_corrupt_file_is_rejected_and_leaves_nothing(
    server: FileServer, tmp_path: Path
) -> None:
    files = model_files(200_000)
    doc = manifest_doc(files)
    doc["files"][1]["sha256"] = hashlib.sha256(b"something else").hexdigest()  # model.*
    server.folders["m"], server.manifests["m"] = files, doc
    async with running_store(cfg(tmp_path)) as store:
        with pytest.raises(ChecksumMismatch) as info:
            await store.fetch(f"{server.url}/m")
        assert "model.safetensors: sha256" in info.value.reason
        assert store.models() == ()
    assert on_disk(tmp_path) == {"entries": [], "partial": []}


async def test_a_longer_file_than_declared_is_rejected(server: FileServer, tmp_path: Path) -> None:
    files = model_files(10_000)
    doc = manifest_doc(files)
    doc["files"][2]["size"] -= 1  # tokenizer.json: the server sends one byte more
    del doc["files"][2]["sha256"]
    server.folders["m"], server.manifests["m"] = files, doc
    async with running_store(cfg(tmp_path)) as store:
        with pytest.raises(ChecksumMismatch, match="more than the declared"):
            await store.fetch(f"{server.url}/m")
    assert on_disk(tmp_path) == {"entries": [], "partial": []}


async def test_bad_sources_raise_typed_errors(server: FileServer, tmp_path: Path) -> None:
    server.folders["weights-only"] = {"model.safetensors": b"x" * 10}
    server.folders["gone"] = model_files(10)
    doc = manifest_doc(server.folders["gone"])
    doc["files"].append({"path": "missing.bin", "size": 3})
    server.manifests["gone"] = doc
    server.folders["bad-manifest"] = {"config.json": b"{}"}
    server.manifests["bad-manifest"] = {"files": [{"path": "../etc/passwd", "size": 1}]}
    async with running_store(cfg(tmp_path)) as store:
        with pytest.raises(SourceNotFound, match="404"):
            await store.fetch(f"{server.url}/nothing-here/")
        with pytest.raises(NotAModel, match="no config.json"):
            await store.fetch(f"{server.url}/weights-only/")
        with pytest.raises(NotAModel, match="bad manifest"):
            await store.fetch(f"{server.url}/bad-manifest/")
        with pytest.raises(SourceNotFound, match="missing.bin"):
            await store.fetch(f"{server.url}/gone/")
        with pytest.raises(SourceNotFound, match="not a folder"):
            await store.fetch(f"file://{tmp_path}/absent")
        with pytest.raises(SourceNotFound, match="not a model source"):
            await store.fetch("ftp://host/model")
        assert {p.uri for p in store.progress()} == {
            f"{server.url}/{name}/"
            for name in ("nothing-here", "weights-only", "bad-manifest", "gone")
        }
    # weights-only: only its manifest was read; nothing of any of them stays on disk.
    assert server.faults.gets("weights-only/model.safetensors") == []
    assert on_disk(tmp_path) == {"entries": [], "partial": []}


async def test_local_sources_are_used_in_place(tmp_path: Path) -> None:
    model = tmp_path / "local"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / "weights").mkdir()
    async with running_store(cfg(tmp_path / "cache")) as store:
        assert await store.fetch(str(model)) == model
        assert await store.fetch(f"file://{model}") == model
        with pytest.raises(NotAModel):
            await store.fetch(f"file://{tmp_path}/weights")
        assert store.models() == ()


async def test_concurrent_fetches_share_one_download(server: FileServer, tmp_path: Path) -> None:
    server.folders["m"] = model_files(500_000)
    server.faults.gate = threading.Event()  # file bodies wait until every fetch has joined
    uri = f"{server.url}/m/"
    paths: list[Path] = []
    async with running_store(cfg(tmp_path)) as store:

        async def fetch(holder: str) -> None:
            paths.append(await store.fetch(uri, holder=holder))

        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(fetch, f"engine-{i}")
            await server.faults.wait_arrival()
            [live] = store.progress()
            assert live.state == "downloading" and live.bytes_total > 0
            server.faults.gate.set()
        [model] = store.models()
        assert model.pinned_by == tuple(f"engine-{i}" for i in range(5))
    assert len(set(paths)) == 1 and len(paths) == 5
    assert [p for _, p, _ in server.faults.requests] == [
        "/m/fleet-manifest.json",
        "/m/config.json",
        "/m/model.safetensors",
        "/m/tokenizer.json",
    ]


async def test_a_cancelled_waiter_leaves_the_download_to_the_others(
    server: FileServer, tmp_path: Path
) -> None:
    server.folders["m"] = model_files(100_000)
    server.faults.gate = threading.Event()
    uri = f"{server.url}/m"
    got: list[Path] = []
    async with running_store(cfg(tmp_path)) as store:

        async def fetch(holder: str, scope: trio.CancelScope) -> None:
            with scope:
                got.append(await store.fetch(uri, holder=holder))

        quitter = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fetch, "a", trio.CancelScope())
            nursery.start_soon(fetch, "quitter", quitter)
            nursery.start_soon(fetch, "b", trio.CancelScope())
            await trio.testing.wait_all_tasks_blocked()
            quitter.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert len(store.progress()) == 1  # the download goes on
            server.faults.gate.set()
        [model] = store.models()
        assert model.pinned_by == ("a", "b")  # the quitter was unpinned when it gave up
        assert got == [model.path, model.path]


async def test_stopping_the_store_mid_download_keeps_only_a_partial(
    server: FileServer, tmp_path: Path
) -> None:
    server.folders["m"] = model_files(100_000)
    server.faults.gate = threading.Event()
    uri = f"{server.url}/m"
    with trio.CancelScope() as scope:
        async with running_store(cfg(tmp_path)) as store:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.fetch, uri)
                await server.faults.wait_arrival()
                scope.cancel()
    assert on_disk(tmp_path) == {"entries": [], "partial": [cache_key(uri)]}
    server.faults.gate.set()
    async with running_store(cfg(tmp_path)) as store:
        path = await store.fetch(uri)
    assert (path / "config.json").read_bytes() == server.folders["m"]["config.json"]


async def test_budget_evicts_least_recently_used_unpinned_models(
    server: FileServer, tmp_path: Path
) -> None:
    size = 100_000
    for name in "abcd":
        server.folders[name] = {"config.json": b"{}", "w.bin": bytes([ord(name)]) * size}
    uri = {name: f"{server.url}/{name}/" for name in "abcd"}
    now = [1000.0]

    def clock() -> float:
        now[0] += 1.0
        return now[0]

    async with running_store(cfg(tmp_path, budget_bytes=int(2.5 * size)), clock=clock) as store:
        await store.fetch(uri["a"], holder="engine-1")  # pinned: never evicted
        await store.fetch(uri["b"])
        await store.fetch(uri["c"])  # over budget: b (unpinned, least recent) goes
        assert [m.uri for m in store.models()] == [uri["a"], uri["c"]]
        with pytest.raises(NoSpace, match="evictable") as info:
            store.pin(uri["c"], "engine-2")
            await store.fetch(uri["d"])
        assert "budget 250000" in info.value.reason
        assert [m.uri for m in store.models()] == [uri["a"], uri["c"]]
        store.unpin(uri["a"], "engine-1")  # a is now the least recently used, unpinned
        await store.fetch(uri["d"])
        assert [m.uri for m in store.models()] == [uri["c"], uri["d"]]
        assert store.models()[0].pinned_by == ("engine-2",)
    assert sorted(on_disk(tmp_path)["entries"]) == sorted(cache_key(uri[n]) for n in "cd")
    assert on_disk(tmp_path)["partial"] == []
    entry = json.loads((tmp_path / "entries" / cache_key(uri["d"]) / "entry.json").read_text())
    assert entry["uri"] == uri["d"]


async def test_disk_space_is_checked_before_downloading(server: FileServer, tmp_path: Path) -> None:
    server.folders["m"] = model_files(1000)
    store_cfg = StoreConfig(root=tmp_path, min_free_bytes=2**62)  # more than any disk has
    async with running_store(store_cfg) as store:
        with pytest.raises(NoSpace, match="disk full"):
            await store.fetch(f"{server.url}/m")
    assert on_disk(tmp_path) == {"entries": [], "partial": []}
    assert server.faults.gets("config.json") == []
