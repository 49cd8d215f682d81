"""API keys (fleet.coordinator.apikeys): the file, the token bucket, and a real coordinator
answering 401 / 429 over HTTP to the official openai client."""

from __future__ import annotations

import hashlib
from pathlib import Path

import openai
import pytest
import trio

from fleet.coordinator.apikeys import ApiKeys, Unauthorized, load_api_keys
from fleet.coordinator.service import Coordinator, CoordinatorAddresses, CoordinatorConfig
from fleet.protocol.errors import ConfigError

KEYS = """
keys:
  - name: search
    key: sk-search-0123456789
    tier: high
    requests_per_s: 2
    burst: 3
  - name: nightly
    key_sha256: {digest}
    tier: batch
"""
NIGHTLY = "sk-nightly-secret"


def _keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(KEYS.format(digest=hashlib.sha256(NIGHTLY.encode()).hexdigest()))
    return path


def test_the_file_lists_names_tiers_and_limits(tmp_path: Path) -> None:
    keys = load_api_keys(_keys_file(tmp_path))
    search = keys.check({"authorization": "Bearer sk-search-0123456789"})
    assert search is not None and search.name == "search" and search.tier == 1
    nightly = keys.check({"authorization": f"bearer {NIGHTLY}"})
    assert nightly is not None and nightly.name == "nightly" and nightly.requests_per_s is None
    for headers in ({}, {"authorization": "Bearer nope-nope-nope"}, {"authorization": "Basic x"}):
        with pytest.raises(Unauthorized) as err:
            keys.check(headers)
        assert err.value.status == 401 and err.value.code == "invalid_api_key"
    assert ApiKeys().check({}) is None  # no file: open


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("keys: []", "--api-keys"),
        ("keys: [{name: a}]", "keys[0]"),
        ("keys: [{name: a, key: short}]", "keys[0].key"),
        ("keys: [{name: a, key: sk-long-enough, tier: vip}]", "keys[0].tier"),
        ("keys: [{name: a, key: sk-long-enough, requests_per_s: 0}]", "keys[0].requests_per_s"),
        ("keys: [{name: a, key: sk-long-enough, burst: 5}]", "keys[0].burst"),
        ("keys: [{name: a, key: sk-long-enough, color: red}]", "keys[0].color"),
        ("keys: [{name: a, key_sha256: abc}]", "keys[0].key_sha256"),
        ("keys: [{name: a, key: sk-long-one}, {name: a, key: sk-long-two}]", "keys[1].name"),
    ],
)
def test_bad_files_are_rejected_naming_the_entry(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "k.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_api_keys(path)
    assert err.value.key == where


async def test_a_coordinator_with_keys_answers_401_and_429(tmp_path: Path) -> None:
    keys = load_api_keys(_keys_file(tmp_path))
    coord = Coordinator(
        CoordinatorConfig(port=0, agent_endpoint="tcp://127.0.0.1:*", api_keys=keys)
    )
    async with trio.open_nursery() as nursery:
        addrs: CoordinatorAddresses = await nursery.start(coord.run)

        def calls() -> list[object]:
            out: list[object] = []
            anonymous = openai.OpenAI(
                base_url=addrs.http_url + "/v1", api_key="wrong-key", max_retries=0
            )
            try:
                anonymous.models.list()
            except openai.AuthenticationError as exc:
                out.append(exc)
            search = openai.OpenAI(
                base_url=addrs.http_url + "/v1", api_key="sk-search-0123456789", max_retries=0
            )
            assert search.models.list().data == []  # listing models spends no request
            for _ in range(4):  # a burst of 3, then 429
                try:
                    search.completions.create(model="none", prompt="x", max_tokens=1)
                except openai.APIStatusError as exc:
                    out.append(exc)
            return out

        errors = await trio.to_thread.run_sync(calls)
        nursery.cancel_scope.cancel()
    auth, *rest = errors
    assert isinstance(auth, openai.AuthenticationError) and auth.code == "invalid_api_key"
    assert [e.status_code for e in rest] == [404, 404, 404, 429]  # type: ignore[attr-defined]
    limited = rest[-1]
    assert isinstance(limited, openai.RateLimitError) and limited.code == "rate_limit_exceeded"
    assert int(limited.response.headers["retry-after"]) >= 1
    metrics = coord.metrics.render().decode()
    assert 'fleet_requests_rate_limited_total{key="search"} 1.0' in metrics
