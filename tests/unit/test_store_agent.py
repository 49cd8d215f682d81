"""An engine whose model_path is a URI: the supervisor fetches it through the model store
(staying 'starting', the reason in last_error), retries with the store's backoff, launches the
engine on the cached folder and pins it while the engine runs. Real child processes (the
stand-in engine of test_supervisor) and a real HTTP source on loopback."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import trio

from fleet.agent.launcher import LaunchConfig
from fleet.agent.store import RetryPolicy, StoreConfig
from fleet.agent.supervisor import EngineSupervisor, SupervisorConfig, is_model_uri
from fleet.protocol.messages import EngineSpec

from .storeservers import FileServer, model_files, running_store

ROOT = Path(__file__).resolve().parents[2]
FAST = SupervisorConfig(
    startup_timeout_s=20, health_interval_s=0.1, startup_poll_s=0.05, health_timeout_s=0.3,
    backoff_base_s=0.05, backoff_max_s=0.2, grace_s=1.0,
)  # fmt: skip
BOUND_S = 30.0  # a bounded wait on a condition, never a sleep


@pytest.fixture
def server() -> Iterator[FileServer]:
    srv = FileServer()
    try:
        yield srv
    finally:
        srv.close()


async def wait_for(sup: EngineSupervisor, done: Callable[[EngineSupervisor], bool]) -> None:
    with trio.fail_after(BOUND_S):
        while not done(sup):
            await sup.changed()


def test_model_uris_are_told_from_paths() -> None:
    assert is_model_uri("hf://org/m") and is_model_uri("file:///m") and is_model_uri("s3://b/p")
    assert not is_model_uri("/models/chat") and not is_model_uri("models/chat")


async def test_engine_waits_for_its_model_then_runs_on_the_cached_folder(
    server: FileServer, tmp_path: Path
) -> None:
    uri = f"{server.url}/chat/"
    store_cfg = StoreConfig(
        root=tmp_path / "store",
        min_free_bytes=0,
        retry=RetryPolicy(base_s=0.05, max_s=0.1, jitter=0.0),
    )
    launch = LaunchConfig(
        python=sys.executable,
        module="tests.unit.fake_engine",
        env=(("FAKE_ENGINE_CHILD_FILE", str(tmp_path / "children")), ("PYTHONPATH", str(ROOT))),
    )
    spec = EngineSpec(engine_id="e0", model="chat", model_path=uri)
    async with running_store(store_cfg) as store, httpx.AsyncClient() as client:
        sup = EngineSupervisor(
            spec, launch=launch, cfg=FAST, kv_endpoint="tcp://127.0.0.1:1", client=client,
            log_dir=tmp_path / "logs", store=store,
        )  # fmt: skip
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.run)
            # The source is not there yet: the engine waits, saying why, and no process starts.
            await wait_for(sup, lambda s: "not_found" in s.last_error)
            assert sup.status().state == "starting" and sup.pid == 0
            assert "404" in sup.status().last_error and "retry" in sup.status().last_error
            server.folders["chat"] = model_files(50_000)  # the operator uploads it
            await wait_for(sup, lambda s: s.state == "ready")
            [model] = store.models()
            assert sup.model_dir == str(model.path) and model.pinned_by == ("e0",)
            assert sup.status().last_error == ""
            nursery.cancel_scope.cancel()
        assert store.models()[0].pinned_by == ()  # released when the engine stopped


async def test_uri_without_a_store_fails_with_a_reason(tmp_path: Path) -> None:
    spec = EngineSpec(engine_id="e1", model="chat", model_path="hf://org/chat")
    async with httpx.AsyncClient() as client:
        sup = EngineSupervisor(
            spec, launch=LaunchConfig(), cfg=FAST, kv_endpoint="tcp://127.0.0.1:1", client=client
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.run)
            await wait_for(sup, lambda s: s.state == "failed")
            assert "no model store" in sup.status().last_error and sup.pid == 0
            nursery.cancel_scope.cancel()
