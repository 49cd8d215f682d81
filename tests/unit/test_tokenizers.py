"""The coordinator's tokenizers of remote models (coordinator/tokenizers.py): the sans-I/O book
with plain calls, then the real thing — the store's SubsetFetcher against a loopback file
server serving the demo model — with a source that cuts transfers until it is fixed, a source
dropped while it fails, and a running coordinator whose deployments name remote sources."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from fleet.agent.store import RetryPolicy, StoreConfig, SubsetFetcher
from fleet.coordinator.deployment import Deployment
from fleet.coordinator.metrics import CoordinatorMetrics
from fleet.coordinator.router.prompt import PromptTokenizer
from fleet.coordinator.service import Coordinator, CoordinatorConfig
from fleet.coordinator.tokenizers import TokenizerBook, Tokenizers, is_remote
from fleet.protocol.vllm_tokenizer import TOKENIZER_FILES, VllmTokenizer

from .storeservers import FileServer

WAIT_S = 30.0  # a bound on every wait: a broken test fails instead of hanging
PROMPT = "Hello, fleet: tokenize me the way the engine will."


def test_is_remote() -> None:
    assert is_remote("hf://org/name@v1") and is_remote("s3://bucket/p")
    assert is_remote("https://host/m/") and is_remote("http://host/m.json")
    assert not is_remote("/models/chat") and not is_remote("models/x")
    assert not is_remote("ftp://host/m")  # not a source at all


def test_the_book_starts_new_remote_sources_once_and_drops_unnamed_ones() -> None:
    book = TokenizerBook()
    assert book.want(["/local", "hf://a/b", "s3://bkt/c"]) == (["hf://a/b", "s3://bkt/c"], [])
    assert book.want(["hf://a/b", "s3://bkt/c", "/local"]) == ([], [])  # already fetching
    assert book.failed("hf://a/b", "unavailable: cut") == (1, True)
    assert book.failed("hf://a/b", "unavailable: cut") == (2, False)  # logged once
    assert book.failed("hf://a/b", "not_found: 404") == (3, True)  # a new cause
    assert book.want(["s3://bkt/c"]) == ([], ["hf://a/b"])
    assert "hf://a/b" not in book.failures and book.pending() == ["s3://bkt/c"]
    book.arrived("s3://bkt/c", "/cache/c")
    assert book.pending() == [] and "s3://bkt/c" not in book.failures
    paths = {"chat": "s3://bkt/c", "alias": "s3://bkt/c", "other": "hf://a/b", "x": "/local"}
    assert book.assignments(paths) == [("alias", "/cache/c"), ("chat", "/cache/c")]
    assert book.want([]) == ([], ["s3://bkt/c"])
    assert book.want(["s3://bkt/c"]) == ([], [])  # fetched before: nothing to fetch again
    assert book.want(["hf://a/b"]) == (["hf://a/b"], ["s3://bkt/c"])


@pytest.fixture
def served(demo_model: Path) -> Iterator[tuple[FileServer, str]]:
    """The demo model (a real tokenizer and chat template) over HTTP with a manifest."""
    server = FileServer()
    server.folders["demo"] = {p.name: p.read_bytes() for p in demo_model.iterdir() if p.is_file()}
    try:
        yield server, f"{server.url}/demo/"
    finally:
        server.close()


def fetcher(root: Path) -> SubsetFetcher:
    retry = RetryPolicy(base_s=0.01, max_s=0.05, jitter=0.0)
    return SubsetFetcher(StoreConfig(root=root, min_free_bytes=0, retry=retry), TOKENIZER_FILES)


@asynccontextmanager
async def running(tokenizers: Tokenizers) -> AsyncIterator[Tokenizers]:
    async with trio.open_nursery() as nursery:
        await nursery.start(tokenizers.run)
        yield tokenizers
        nursery.cancel_scope.cancel()


def gauge(metrics: CoordinatorMetrics, uri: str) -> float | None:
    return metrics.registry.get_sample_value("fleet_tokenizer_ready", {"source": uri})


async def test_a_remote_model_routes_by_prefix_once_its_source_recovers(
    served: tuple[FileServer, str],
    demo_model: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, uri = served
    server.faults.cut_after["/tokenizer.json"] = 1000  # the connection drops mid-file
    expected = VllmTokenizer(demo_model).encode(PROMPT, add_special_tokens=True)
    deployments = [
        Deployment(model="chat", aliases=("chat-alias",), model_path=uri),
        Deployment(model="local", model_path=str(demo_model)),
    ]
    prompt = PromptTokenizer({"chat": uri, "chat-alias": uri, "local": str(demo_model)})
    metrics = CoordinatorMetrics()
    tokenizers = Tokenizers(prompt, fetcher(tmp_path), metrics)
    tokenizers.want(deployments)
    caplog.set_level(logging.INFO, logger="fleet.coordinator")
    body = {"prompt": PROMPT}
    async with running(tokenizers):
        assert await prompt.tokens("chat", "completion", body) is None  # not here yet
        assert list(await prompt.tokens("local", "completion", body) or ()) == expected
        with trio.fail_after(WAIT_S):
            while tokenizers.book.failures.get(uri, 0) < 3:
                await tokenizers.changed()
        assert gauge(metrics, uri) == 0.0
        server.faults.cut_after.clear()  # the source is back
        with trio.fail_after(WAIT_S):
            while uri not in tokenizers.book.folders:
                await tokenizers.changed()
        assert list(await prompt.tokens("chat", "completion", body) or ()) == expected
        assert list(await prompt.tokens("chat-alias", "completion", body) or ()) == expected
        chat = {"messages": [{"role": "user", "content": PROMPT}]}
        assert await prompt.tokens("chat", "chat", chat) == await prompt.tokens(
            "local", "chat", chat
        )  # the chat template came too
    assert gauge(metrics, uri) == 1.0
    failures = metrics.registry.get_sample_value(
        "fleet_tokenizer_fetch_failures_total", {"kind": "unavailable"}
    )
    assert failures is not None and failures >= 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and uri in r.message]
    assert len(warnings) == 1, [r.message for r in warnings]  # one cause, logged once
    assert any(re.search(r"tokenizer of .* ready at .*chat, chat-alias", r.message)
               for r in caplog.records)  # fmt: skip
    assert not server.faults.gets("model.safetensors")  # the coordinator never wants weights


async def test_a_source_no_deployment_names_stops_being_fetched(
    served: tuple[FileServer, str], tmp_path: Path
) -> None:
    server, uri = served
    missing = uri.replace("/demo/", "/not-uploaded-yet/")
    prompt = PromptTokenizer({"m": missing})
    metrics = CoordinatorMetrics()
    tokenizers = Tokenizers(prompt, fetcher(tmp_path), metrics)
    async with running(tokenizers):
        tokenizers.want([Deployment(model="m", model_path=missing)])  # after start: admin API
        with trio.fail_after(WAIT_S):
            while tokenizers.book.failures.get(missing, 0) < 2:  # 404s are retried too
                await tokenizers.changed()
        assert tokenizers.fetching == {missing} and gauge(metrics, missing) == 0.0
        tokenizers.want([])
        with trio.fail_after(WAIT_S):
            while tokenizers.fetching:
                await tokenizers.changed()
        assert gauge(metrics, missing) is None and missing not in tokenizers.book.failures


async def test_without_a_fetcher_remote_models_route_without_prefix(
    served: tuple[FileServer, str],
) -> None:
    server, uri = served
    prompt = PromptTokenizer({"chat": uri})
    tokenizers = Tokenizers(prompt, None, CoordinatorMetrics())
    tokenizers.want([Deployment(model="chat", model_path=uri)])
    async with running(tokenizers):
        assert await prompt.tokens("chat", "completion", {"prompt": PROMPT}) is None
    assert server.faults.requests == []


async def test_a_coordinator_fetches_at_start_and_on_new_deployments(
    served: tuple[FileServer, str], demo_model: Path, tmp_path: Path
) -> None:
    server, uri = served
    server.folders["copy"] = server.folders["demo"]
    other = uri.replace("/demo/", "/copy/")
    expected = VllmTokenizer(demo_model).encode(PROMPT, add_special_tokens=True)
    cfg = CoordinatorConfig(
        port=0,
        agent_endpoint="tcp://127.0.0.1:*",
        deployments=(Deployment(model="chat", model_path=uri),),
        placement_settle_s=0.0,
        grace_s=0.5,
    )
    coord = Coordinator(cfg, tokenizer_files=fetcher(tmp_path))
    body = {"prompt": PROMPT}
    async with trio.open_nursery() as nursery:
        addrs = await nursery.start(coord.run)
        with trio.fail_after(WAIT_S):
            while uri not in coord.tokenizers.book.folders:
                await coord.tokenizers.changed()
        assert list(await coord.prompt_tokenizer.tokens("chat", "completion", body) or ()) == (
            expected
        )
        coord.set_deployments(  # what a folder reload, a FleetModel or the admin API end in
            (
                Deployment(model="chat", model_path=uri),
                Deployment(model="beta", model_path=other),
            )
        )
        with trio.fail_after(WAIT_S):
            while other not in coord.tokenizers.book.folders:
                await coord.tokenizers.changed()
        assert list(await coord.prompt_tokenizer.tokens("beta", "completion", body) or ()) == (
            expected
        )
        async with httpx.AsyncClient(base_url=addrs.http_url) as http:
            text = (await http.get("/metrics")).text
        assert f'fleet_tokenizer_ready{{source="{uri}"}} 1.0' in text
        assert f'fleet_tokenizer_ready{{source="{other}"}} 1.0' in text
        nursery.cancel_scope.cancel()
    assert not server.faults.gets("model.safetensors")
