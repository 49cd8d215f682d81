"""The simulator's NixlConnector round trip (fleet.agent.sim.kvtransfer): ``--kv-transfer-config``
as vLLM reads it; a prefill engine answers ``kv_transfer_params`` naming its blocks; a decode
engine given them loads the prompt (no prefill time, counted as external prefix-cache hits)."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import httpx
import pytest
import trio

from fleet.agent.sim.cache import PrefixCache
from fleet.agent.sim.kvtransfer import parse_kv_transfer_config, wants_remote_prefill
from fleet.agent.sim.latency import LatencyModel
from fleet.agent.sim.scheduler import Scheduler, SimRequest
from fleet.protocol.errors import ConfigError

from .simgateway import start_sim_server

LATENCY = LatencyModel(prefill_ms_per_token=62.5, decode_ms_per_token=500, decode_batch_slope=0.5)
NIXL = json.dumps({"kv_connector": "NixlConnector", "kv_role": "kv_both", "engine_id": "eng-p"})


def test_the_config_is_read_as_vllm_reads_it() -> None:
    env = {"VLLM_NIXL_SIDE_CHANNEL_HOST": "10.1.2.3", "VLLM_NIXL_SIDE_CHANNEL_PORT": "5601"}
    cfg = parse_kv_transfer_config(NIXL, env)
    assert cfg is not None and cfg.simulated and cfg.role == "kv_both"
    assert (cfg.engine_id, cfg.side_channel_host, cfg.side_channel_port) == (
        "eng-p", "10.1.2.3", 5601
    )  # fmt: skip
    defaults = parse_kv_transfer_config(
        '{"kv_connector": "NixlConnector", "kv_role": "kv_both"}', {}
    )
    assert defaults is not None and len(defaults.engine_id) == 36  # a uuid4, as vLLM's
    assert (defaults.side_channel_host, defaults.side_channel_port) == ("localhost", 5600)
    example = '{"kv_connector": "ExampleConnector", "kv_role": "kv_producer"}'
    assert not parse_kv_transfer_config(example, {}).simulated  # type: ignore[union-attr]
    assert parse_kv_transfer_config(None, {}) is None
    assert parse_kv_transfer_config("{}", {}) is None
    for bad, key in (
        ('{"kv_connector": "NixlConnector"}', "kv_role"),
        ('{"kv_connector": "P2pNcclConnector", "kv_role": "kv_both"}', "kv_connector"),
        ('{"kv_connecter": "NixlConnector"}', "--kv-transfer-config"),
        ("[1]", "--kv-transfer-config"),
    ):
        with pytest.raises(ConfigError) as err:
            parse_kv_transfer_config(bad, {})
        assert key in err.value.key


def test_a_decode_request_needs_every_remote_field() -> None:
    full = {"do_remote_prefill": True, "remote_engine_id": "e", "remote_block_ids": [[1]],
            "remote_host": "h", "remote_port": 1}  # fmt: skip
    assert wants_remote_prefill(full)
    assert not wants_remote_prefill({**full, "remote_host": None})
    assert not wants_remote_prefill({**full, "do_remote_prefill": False})
    assert not wants_remote_prefill(None)


def _request(rid: str, prompt: tuple[int, ...], max_tokens: int = 2, **kw: bool) -> SimRequest:
    counter = itertools.count(1000)
    return SimRequest(rid, prompt, max_tokens, 0.0, lambda: next(counter), **kw)


def test_a_loaded_prompt_costs_one_token_of_prefill() -> None:
    cache = PrefixCache(block_size=4, num_blocks=64, hash_seed="t")
    scheduler = Scheduler(cache, LATENCY, max_num_seqs=8, max_batched_tokens=1024)
    prompt = tuple(range(10, 42))  # 32 tokens, 8 blocks
    cached = _request("a", prompt[:16])
    scheduler.add(cached)
    scheduler.finish_step(scheduler.schedule(0.0), 1.0)  # 16 tokens now in the prefix cache
    scheduler.abort("a", 1.0)
    loaded = _request("b", prompt, remote_prefill=True)
    scheduler.add(loaded)
    loading = scheduler.schedule(2.0)  # admitted: its uncached tokens' KV is on its way
    assert not loading.entries and loading.admitted == (loaded,)
    arrives = 2.0 + LATENCY.transfer_s(15)  # 16 uncached, the last one computed, not loaded
    assert arrives == pytest.approx(2.0 + (1.0 + 0.004 * 15) / 1000)
    assert scheduler.next_loaded_s(2.0) == arrives and scheduler.next_loaded_s(arrives) is None
    plan = scheduler.schedule(arrives)
    assert plan.prefill_tokens == 1 and plan.duration_s == LATENCY.step_s(
        prefill_tokens=1, decode_seqs=0
    )  # one token of compute, not the 16 uncached ones
    assert (loaded.num_cached_tokens, loaded.num_external_tokens) == (16, 16)
    assert cache.blocks_of("b") == 8  # every prompt block held (and cached, as after a load)
    result = scheduler.finish_step(plan, 3.0)
    assert [o.request_id for o in result.outputs] == ["b"]  # its first token at once
    # a prefill request keeps its block ids when it finishes (what a decode engine reads)
    sender = _request("c", prompt, max_tokens=1, keep_block_ids=True)
    scheduler.add(sender)
    plan = scheduler.schedule(4.0)
    held = cache.block_ids("c")
    scheduler.finish_step(plan, 5.0)
    assert sender.status == "finished" and sender.block_ids == tuple(held) and len(held) == 8


def test_a_kv_load_delays_its_request_not_the_batch() -> None:
    latency = LatencyModel(
        prefill_ms_per_token=1, decode_ms_per_token=10, kv_transfer_ms_per_token=10,
        kv_transfer_base_ms=100,
    )  # fmt: skip
    scheduler = Scheduler(
        PrefixCache(block_size=4, num_blocks=64, hash_seed="t"), latency,
        max_num_seqs=8, max_batched_tokens=1024,
    )  # fmt: skip
    local = _request("local", tuple(range(8)), max_tokens=50)
    scheduler.add(local)
    scheduler.finish_step(scheduler.schedule(0.0), 0.01)  # local decodes from here on
    remote = _request("remote", tuple(range(100, 132)), max_tokens=2, remote_prefill=True)
    scheduler.add(remote)
    now, firsts = 0.01, {}
    while "remote" not in firsts:
        plan = scheduler.schedule(now)
        if not plan.entries:  # only the load is left to wait for
            now = scheduler.next_loaded_s(now) or pytest.fail("idle with nothing loading")
            continue
        now += plan.duration_s
        for out in scheduler.finish_step(plan, now).outputs:
            firsts.setdefault(out.request_id, now)
    # 31 tokens loaded: 100 + 31 x 10 ms = 0.41 s, then the next step boundary and its own step
    assert 0.01 + 0.41 < firsts["remote"] <= 0.01 + 0.41 + 2 * 0.011
    # the local stream kept decoding meanwhile
    assert local.num_computed - 8 >= 40  # ~41 decode steps of 10 ms ran during the load


async def _metric(http: httpx.AsyncClient, url: str, name: str) -> float:
    text = (await http.get(url + "/metrics")).text
    found = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M)
    assert found is not None, name
    return float(found.group(1))


async def test_prefill_then_decode_over_http(demo_model: Path, nursery: trio.Nursery) -> None:
    _, p = await start_sim_server(demo_model, nursery, "--kv-transfer-config", NIXL)
    _, d = await start_sim_server(
        demo_model, nursery, "--kv-transfer-config", NIXL.replace("eng-p", "eng-d")
    )
    _, plain = await start_sim_server(demo_model, nursery)
    prompt = " ".join(f"word{i}" for i in range(100))
    body = {"model": "demo", "prompt": prompt, "max_tokens": 3, "temperature": 0}
    async with httpx.AsyncClient() as http:
        asked = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                 "remote_block_ids": None, "remote_host": None, "remote_port": None}  # fmt: skip
        first = await http.post(
            p + "/v1/completions",
            json={**body, "max_tokens": 1, "kv_transfer_params": asked},
            headers={"x-request-id": "r1"},
        )
        params = first.json()["kv_transfer_params"]
        tokens = first.json()["usage"]["prompt_tokens"]
        assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
        assert params["remote_engine_id"] == "eng-p" and params["remote_request_id"] == "cmpl-r1"
        assert (params["remote_host"], params["remote_port"]) == ("localhost", 5600)
        assert params["remote_num_tokens"] == tokens and params["transfer_mode"] == "pull"
        assert len(params["remote_block_ids"][0]) == -(-tokens // 32)
        decoded = await http.post(
            d + "/v1/completions", json={**body, "kv_transfer_params": params}
        )
        assert decoded.json()["kv_transfer_params"] is None  # a decode engine answers none
        assert await _metric(http, d, "vllm:external_prefix_cache_hits_total") == tokens
        assert await _metric(http, d, "vllm:external_prefix_cache_queries_total") == tokens
        assert await _metric(http, d, "vllm:prefix_cache_hits_total") == 0
        # without a connector the params are ignored (as vLLM ignores them): computed locally
        ignored = await http.post(
            plain + "/v1/completions", json={**body, "kv_transfer_params": params}
        )
        assert ignored.json()["choices"][0]["text"] == decoded.json()["choices"][0]["text"]
        assert await _metric(http, plain, "vllm:external_prefix_cache_hits_total") == 0
        streamed = await http.post(
            p + "/v1/completions", json={**body, "stream": True, "kv_transfer_params": asked}
        )
        assert "kv_transfer_params" not in streamed.text  # only non-streamed answers carry them
    nursery.cancel_scope.cancel()
