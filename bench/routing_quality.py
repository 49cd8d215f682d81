"""Routing quality: prefix-cache hit rate at the engines, TTFT and load balance, per router.

Workload: multi-turn chat conversations in groups that share a system prompt (as agents and
assistants built on one prompt do). Conversations start on a Poisson schedule; each next turn
waits for the previous answer, appends it, adds a user message, and is sent after a short think
time. Every target gets the same conversations (same seeds) on fresh simulated engines.

Targets, in one run: Fleet (``fleet up --engine sim``), vllm-router ``round_robin``,
``cache_aware`` and ``kv_aware`` (fed the same engines' KV events), sglang-router
``cache_aware`` (``sglang_cache_aware``: its approximate radix tree over request text; its
engines also serve the model as ``unknown``, which sglang-router needs to route vLLM at all), and
the single-engine ceiling (the same workload with all traffic on one engine: the most prefix
reuse any router can get).

Measured at the engines, from their own ``/metrics`` (vLLM's names): prefix-cache hit rate =
Δ``vllm:prefix_cache_hits_total`` / Δ``vllm:prefix_cache_queries_total`` over all engines, load
= Δ``vllm:request_success_total`` per engine (max/mean); TTFT p50/p99 at the client. The engines'
counters are also sampled every ``--sample-s`` seconds during the run: ``hit_rate_over_time.png``
plots each router's hit rate per sampling window (the cache warms up, then routing decides).

Engines run with ``--enable-scale-out`` so that vllm-router's ``cache_aware`` and ``kv_aware``
get token ids from ``/v1/chat/completions/render`` (without it they route prefix-blind).
"""

from __future__ import annotations

import argparse
import random
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio

from . import report, targets
from .stats import summary_ms

WORDS = (
    "cluster engine prefix cache token route schedule latency throughput replica shard gpu node "
    "request stream batch queue model prompt block memory index score filter picker session"
).split()


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engines", type=int, default=8)
    p.add_argument("--groups", type=int, default=8, help="distinct system prompts")
    p.add_argument("--conversations", type=int, default=64)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--system-words", type=int, default=120)
    p.add_argument("--rate", type=float, default=4.0, help="conversation starts per second")
    p.add_argument("--think-s", type=float, default=0.2)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument(
        "--engine",
        choices=["sim", "vllm"],
        default="sim",
        help="simulated engines, or real vLLM CPU engines (slow: use --engines 2)",
    )
    p.add_argument("--sim-arg", action="append", default=None, help="extra engine flag")
    p.add_argument(
        "--fleet-config",
        default=None,
        help="an EndpointPickerConfig YAML for Fleet (default: Fleet's own default profile)",
    )
    p.add_argument(
        "--targets",
        default="fleet,round_robin,cache_aware,kv_aware,sglang_cache_aware,single",
        help="comma-separated subset",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds over all targets (interleaved); hit rate and balance are reported as the "
        "mean with the range",
    )
    p.add_argument("--sample-s", type=float, default=1.0, help="hit-rate sampling period")


def run(args: argparse.Namespace, out: Path | None = None) -> dict[str, Any]:
    """Run the benchmark and write its results."""
    sim_args = tuple(args.sim_arg or ())
    log_dir = Path(tempfile.mkdtemp(prefix="bench-routing-"))
    wanted = args.targets.split(",")
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in wanted}
    for i in range(args.repeat):  # interleaved, so that drift of the machine hits every target
        for name in wanted:
            run_ = _run_target(name, args, sim_args, log_dir / f"{name}-{i}")
            rounds[name].append(run_)
            print(f"{name} (round {i + 1}/{args.repeat}): {run_['summary']}")
    results = {name: _aggregate(runs) for name, runs in rounds.items()}
    ceiling = results.get("single", {}).get("hit_rate")
    for r in results.values():
        r["hit_rate_vs_ceiling"] = round(r["hit_rate"] / ceiling, 3) if ceiling else None
    cfg = {k: v for k, v in vars(args).items() if k not in ("run", "out")}
    result = {"config": cfg, "targets": results, "logs": str(log_dir)}
    samples = {_label(name): r.pop("_ttfts_ms") for name, r in results.items()}
    md = _markdown(result)
    folder = report.write("routing_quality", result, md, out=out)
    report.cdf_png(
        folder / "ttft_cdf.png",
        samples,
        xlabel="time to first token (ms)",
        title="Routing quality: TTFT CDF per router, same conversations",
    )
    report.lines_png(
        folder / "hit_rate_over_time.png",
        {_label(name): [tuple(p) for p in r["hit_rate_over_time"]] for name, r in results.items()},
        xlabel="seconds since the first conversation started",
        ylabel=f"prefix-cache hit rate per {args.sample_s:g} s window",
        title="Routing quality: hit rate at the engines over time",
    )
    print(md)
    print(f"\nwritten to {folder}")
    return result


def _run_target(
    name: str, args: argparse.Namespace, sim_args: tuple[str, ...], log: Path
) -> dict[str, Any]:
    if name == "fleet":
        config = ["--scheduler-config", args.fleet_config] if args.fleet_config else []
        with targets.fleet_up(args.engines, log, sim_args, config, kind=args.engine) as (
            url,
            engine_urls,
        ):
            return _drive(url, engine_urls, args)
    n = 1 if name == "single" else args.engines
    sglang = name.startswith("sglang_")
    names = targets.SGLANG_NAMES if sglang else (targets.MODEL_NAME,)
    kv = name == "kv_aware"
    with targets.sims(n, log, sim_args, kv=kv, kind=args.engine, names=names) as engines:
        engine_urls = [u for u, _ in engines]
        if name == "single":
            return _drive(engine_urls[0], engine_urls, args)
        if sglang:
            with targets.sglang_router(engine_urls, log, name.removeprefix("sglang_")) as url:
                return _drive(url, engine_urls, args)
        extra: list[str] = []
        if name == "kv_aware":
            for url, endpoint in engines:
                extra += ["--kv-event-source", f"{url}={endpoint}"]
            extra += ["--kv-event-block-size", "32", "--kv-event-model", targets.MODEL_NAME]
        with targets.vllm_router(engine_urls, log, name, extra) as url:
            return _drive(url, engine_urls, args)


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One target's rounds: mean hit rate and balance (with each round's), pooled TTFTs."""
    out = dict(runs[0])
    hits = [r["hit_rate"] for r in runs]
    loads = [r["load_max_over_mean"] or 0.0 for r in runs]
    ttfts = [t for r in runs for t in r["_ttfts_ms"]]
    out["hit_rate"] = round(sum(hits) / len(hits), 4)
    out["hit_rate_runs"] = hits
    out["load_max_over_mean"] = round(sum(loads) / len(loads), 3)
    out["load_runs"] = loads
    out["_ttfts_ms"] = ttfts
    out["ttft"] = summary_ms([t / 1000 for t in ttfts])
    out["requests"] = sum(r["requests"] for r in runs)
    out["errors"] = sum(r["errors"] for r in runs)
    return out


def _conversations(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    rng = random.Random(args.seed)
    systems = [
        f"You are assistant {g}. " + " ".join(rng.choice(WORDS) for _ in range(args.system_words))
        for g in range(args.groups)
    ]
    convs = []
    for c in range(args.conversations):
        system = systems[c % args.groups]
        users = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
            for _ in range(args.turns)
        ]
        convs.append((system, users))
    return convs


def _drive(url: str, engine_urls: list[str], args: argparse.Namespace) -> dict[str, Any]:
    before = {u: _engine_metrics(u) for u in engine_urls}
    ttfts: list[float] = []
    errors: list[str] = []
    over_time: list[tuple[float, float]] = []
    trio.run(
        _run_and_sample,
        url,
        engine_urls,
        _conversations(args),
        args,
        ttfts,
        errors.append,
        over_time,
    )
    after = {u: _engine_metrics(u) for u in engine_urls}
    queries = sum(after[u]["queries"] - before[u]["queries"] for u in engine_urls)
    hits = sum(after[u]["hits"] - before[u]["hits"] for u in engine_urls)
    load = [after[u]["requests"] - before[u]["requests"] for u in engine_urls]
    mean = sum(load) / len(load) if load else 0
    hit_rate = hits / queries if queries else 0.0
    ttft = summary_ms(ttfts)
    result: dict[str, Any] = {
        "requests": len(ttfts) + len(errors),
        "errors": len(errors),
        "first_errors": errors[:3],
        "hit_rate": round(hit_rate, 4),
        "ttft": ttft,
        "_ttfts_ms": [t * 1000 for t in ttfts],
        "load_per_engine": load,
        "load_max_over_mean": round(max(load) / mean, 3) if mean else None,
        "hit_rate_over_time": over_time,
    }
    result["summary"] = (
        f"hit rate {hit_rate:.3f}, TTFT p50 {ttft.get('p50_ms')} ms, "
        f"max/mean {result['load_max_over_mean']}, errors {len(errors)}"
    )
    return result


async def _run_and_sample(
    url: str,
    engine_urls: list[str],
    convs: list[tuple[str, list[str]]],
    args: argparse.Namespace,
    ttfts: list[float],
    on_error: Callable[[str], None],
    over_time: list[tuple[float, float]],
) -> None:
    """Run the conversations while sampling the engines' hit rate every ``sample_s``."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_sample_hit_rate, engine_urls, args.sample_s, over_time)
        await _run_conversations(url, convs, args, ttfts, on_error)
        nursery.cancel_scope.cancel()


async def _sample_hit_rate(
    engine_urls: list[str], period_s: float, out: list[tuple[float, float]]
) -> None:
    """Append (seconds, hit rate in the window just ended) for every window with queries."""
    start = trio.current_time()
    async with httpx.AsyncClient(timeout=30) as client:
        last = await _totals(client, engine_urls)
        while True:
            await trio.sleep(period_s)
            now = await _totals(client, engine_urls)
            queries, hits = now[0] - last[0], now[1] - last[1]
            if queries > 0:
                out.append((round(trio.current_time() - start, 2), round(hits / queries, 4)))
            last = now


async def _totals(client: httpx.AsyncClient, engine_urls: list[str]) -> tuple[float, float]:
    queries = hits = 0.0
    for url in engine_urls:
        m = _parse_metrics((await client.get(url + "/metrics")).text)
        queries, hits = queries + m["queries"], hits + m["hits"]
    return queries, hits


async def _run_conversations(
    url: str,
    convs: list[tuple[str, list[str]]],
    args: argparse.Namespace,
    ttfts: list[float],
    on_error: Callable[[str], None],
) -> None:
    rng = random.Random(args.seed + 1)
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        async with trio.open_nursery() as nursery:
            for conv in convs:
                nursery.start_soon(_conversation, client, conv, args, ttfts, on_error)
                await trio.sleep(rng.expovariate(args.rate))


async def _conversation(
    client: httpx.AsyncClient,
    conv: tuple[str, list[str]],
    args: argparse.Namespace,
    ttfts: list[float],
    on_error: Callable[[str], None],
) -> None:
    system, users = conv
    messages: list[dict[str, str]] = [{"role": "system", "content": system}]
    for user in users:
        messages.append({"role": "user", "content": user})
        body = {
            "model": targets.MODEL_NAME,
            "messages": messages,
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        start = trio.current_time()
        first: float | None = None
        text: list[str] = []
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                if resp.status_code != 200:
                    on_error(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
                    return
                async for line in resp.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    piece = re.search(r'"content":"((?:[^"\\]|\\.)*)"', line)
                    if piece and piece.group(1):
                        if first is None:
                            first = trio.current_time() - start
                        text.append(piece.group(1))
        except httpx.HTTPError as exc:
            on_error(f"{type(exc).__name__}: {exc}")
            return
        if first is not None:
            ttfts.append(first)
        messages.append({"role": "assistant", "content": "".join(text)})
        await trio.sleep(args.think_s)


def _engine_metrics(url: str) -> dict[str, float]:
    return _parse_metrics(httpx.get(url + "/metrics", timeout=30).text)


def _parse_metrics(text: str) -> dict[str, float]:
    def total(name: str) -> float:
        pattern = rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)"
        return sum(float(v) for v in re.findall(pattern, text, re.M))

    return {
        "queries": total("vllm:prefix_cache_queries_total"),
        "hits": total("vllm:prefix_cache_hits_total"),
        "requests": total("vllm:request_success_total"),
    }


def _label(name: str) -> str:
    if name == "single":
        return "single engine (ceiling)"
    if name.startswith("sglang_"):
        return f"sglang-router {name.removeprefix('sglang_')}"
    return "Fleet" if name == "fleet" else f"vllm-router {name}"


def _markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    rows = []
    for name, r in result["targets"].items():
        hit: Any = r["hit_rate"]
        load: Any = r["load_max_over_mean"] or "-"
        if len(r.get("hit_rate_runs", [])) > 1:
            hit = f"{hit:.3f} ({min(r['hit_rate_runs']):.3f}–{max(r['hit_rate_runs']):.3f})"
            load = f"{load:.2f} ({min(r['load_runs']):.2f}–{max(r['load_runs']):.2f})"
        rows.append(
            [
                _label(name),
                hit,
                r["hit_rate_vs_ceiling"] or "-",
                r["ttft"].get("p50_ms", "-"),
                r["ttft"].get("p99_ms", "-"),
                load,
                f"{r['errors']}/{r['requests']}",
            ]
        )
    engines = "real vLLM CPU engines" if cfg.get("engine") == "vllm" else "simulated engines"
    md = (
        f"### Routing quality ({cfg['engines']} {engines}, {cfg['conversations']} "
        f"conversations × {cfg['turns']} turns, {cfg['groups']} shared system prompts)\n\n"
    )
    return md + report.table(
        [
            "router",
            "hit rate",
            "× ceiling",
            "TTFT p50 ms",
            "TTFT p99 ms",
            "load max/mean",
            "errors",
        ],
        rows,
    )


__all__ = ["add_args", "run"]
