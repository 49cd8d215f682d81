"""P/D split: TTFT and inter-token latency of long-prompt traffic, split against unsplit.

The same open-loop workload, in real time, against two fleets of the same ``--engines``
simulated engines started by ``fleet up --engine sim --deployments DIR --scheduler-config FILE``:

* **unsplit**: every engine does both (``spec.replicas: N``), Fleet's default profile;
* **split**: ``spec.roles: {prefill: K, decode: N-K}`` with NixlConnector, scheduled by a
  reduced form of docs/ROUTING.md's P/D config (a prompt with ``--threshold`` or more uncached
  tokens is prefilled on a prefill engine, then decoded on a decode engine).

Workload (two Poisson streams, seeded, identical for both fleets, every request streamed):
``long`` requests (prompts of ``--long-tokens`` tokens, short answers) and ``chat`` requests
(short prompts, long answers: the ongoing streams whose token gaps a long prefill stretches).
The simulator's step time is prefill tokens × cost plus the decode cost of the step
(agent/sim/latency.py), so a long prompt prefilled in a step delays every stream decoding in
that step, as on a GPU. Reported per load level (``--long-rates``), fleet and class: TTFT
p50/p99, inter-token latency p50/p99 (gaps between a stream's text chunks, pooled), streams with
a gap over 100 ms, output tokens/s, the coordinator's ``fleet_pd_requests_total`` by outcome,
and the token gaps as the engines timed them (``vllm:inter_token_latency_seconds``: without the
client's, the coordinator's and the machine's stalls).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from . import report, targets
from .stats import summary_ms

NIXL = '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'
WORDS = ("the", "cat", "sat", "on", "a", "mat", "and", "then", "went", "home", "river", "stone")
TOKENS_PER_WORD = 1.28  # the demo model's tokenizer on WORDS (measured)
CLASSES = ("long", "chat")
SPLIT_CONFIG = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: decode-filter
- type: prefill-filter
- type: healthy-filter
- type: precise-prefix-cache-scorer
- type: active-request-scorer
- type: max-score-picker
- type: prefix-based-pd-decider
  parameters: {{nonCachedTokens: {threshold}}}
- type: disagg-profile-handler
  parameters: {{deciders: {{prefill: prefix-based-pd-decider}}}}
schedulingProfiles:
- name: decode
  plugins: [{{pluginRef: decode-filter}}, {{pluginRef: healthy-filter}},
            {{pluginRef: precise-prefix-cache-scorer, weight: 2}},
            {{pluginRef: active-request-scorer, weight: 1}}, {{pluginRef: max-score-picker}}]
- name: prefill
  plugins: [{{pluginRef: prefill-filter}}, {{pluginRef: healthy-filter}},
            {{pluginRef: active-request-scorer}}, {{pluginRef: max-score-picker}}]
"""


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engines", type=int, default=3, help="simulated engines in each fleet")
    p.add_argument("--prefill", type=int, default=1, help="prefill engines of the split fleet")
    p.add_argument("--duration-s", type=float, default=25.0, help="seconds of arrivals per fleet")
    p.add_argument(
        "--long-rates",
        default="1.5,4",
        help="long-prompt requests/s, one load level each (comma-separated)",
    )
    p.add_argument("--long-tokens", default="2048-4096", help="long prompts' size range, tokens")
    p.add_argument("--long-max-tokens", type=int, default=32, help="long requests' answer")
    p.add_argument("--chat-rate", type=float, default=3.0, help="short-prompt streams/s")
    p.add_argument("--chat-max-tokens", type=int, default=128, help="chat streams' answer")
    p.add_argument("--threshold", type=int, default=384, help="nonCachedTokens of the decider")
    p.add_argument("--sim-arg", action="append", default=[], help="simulator flag (repeatable)")
    p.add_argument("--scenarios", default="unsplit,split", help="which fleets, in this order")
    p.add_argument("--seed", type=int, default=0)


@dataclass(frozen=True)
class Job:
    """One request of the workload: when it leaves, its class, its body."""

    at: float
    cls: str
    body: dict[str, Any]


@dataclass
class Result:
    """What one streamed request saw (seconds from its start)."""

    cls: str
    status: int = 0
    error: str = ""
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    tokens: int = 0
    end_s: float = 0.0
    prefill_pod: str = ""
    pod: str = ""


def _prompt(rng: random.Random, tokens: int, head: str) -> str:
    words = int(tokens / TOKENS_PER_WORD)
    # a distinct head: no two prompts (of any level) share a cached prefix
    return f"{head} {rng.random()}: " + " ".join(rng.choice(WORDS) for _ in range(words))


def workload(args: argparse.Namespace, long_rate: float, tag: str = "level") -> list[Job]:
    """The seeded open-loop schedule: both classes' Poisson arrivals, merged by time."""
    rng = random.Random(args.seed)
    low, _, high = args.long_tokens.partition("-")
    lo, hi = int(low), int(high or low)
    jobs: list[Job] = []
    for cls, rate in (("long", long_rate), ("chat", args.chat_rate)):
        t = rng.expovariate(rate) if rate > 0 else args.duration_s
        while t < args.duration_s:
            head = f"{tag} {long_rate:g} request {len(jobs)}"
            if cls == "long":
                prompt = _prompt(rng, rng.randint(lo, hi), head)
                max_tokens = args.long_max_tokens
            else:
                prompt, max_tokens = _prompt(rng, 64, head), args.chat_max_tokens
            body = {"model": targets.MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
            jobs.append(Job(t, cls, body))
            t += rng.expovariate(rate)
    return sorted(jobs, key=lambda j: j.at)


def warmup(args: argparse.Namespace) -> list[Job]:
    """A few requests of both classes before the measured run (not counted)."""
    warm = argparse.Namespace(**{**vars(args), "duration_s": 2.0, "seed": args.seed + 1})
    jobs = workload(warm, 2.0, tag="warm-up")[:6]
    return [Job(i * 0.05, j.cls, {**j.body, "max_tokens": 2}) for i, j in enumerate(jobs)]


async def _one(client: httpx.AsyncClient, job: Job, out: list[Result]) -> None:
    r = Result(job.cls)
    start = trio.current_time()
    last: float | None = None
    try:
        async with client.stream("POST", "/v1/completions", json=job.body) as resp:
            r.status = resp.status_code
            r.prefill_pod = resp.headers.get("x-prefill-pod", "")
            r.pod = resp.headers.get("x-selected-pod", "")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if any(c.get("text") for c in chunk.get("choices") or []):
                    now = trio.current_time()
                    if last is None:
                        r.ttft_s = now - start
                    else:
                        r.gaps_s.append(now - last)
                    last = now
                    r.tokens += 1
            if r.status != 200:
                r.error = f"HTTP {r.status}"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        r.error = f"{type(exc).__name__}: {exc}"[:200]
    r.end_s = trio.current_time() - start
    out.append(r)


async def drive(
    url: str, jobs: Sequence[Job], timeout_s: float = 120.0
) -> tuple[list[Result], float]:
    """Send every job on schedule, streamed; the results and the run's wall time."""
    results: list[Result] = []
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            for job in jobs:
                await trio.sleep_until(t0 + job.at)
                nursery.start_soon(_one, client, job, results)
        wall = trio.current_time() - t0
    return results, wall


def _deployment(
    model: Path, engines: int, prefill: int, split: bool, sim_args: Sequence[str]
) -> str:
    count = (
        f"roles: {{prefill: {prefill}, decode: {engines - prefill}}}"
        if split
        else (f"replicas: {engines}")
    )
    engine_args = ["--max-model-len=8192", f"--kv-transfer-config={NIXL}", *sim_args]
    return (
        "apiVersion: fleet.dev/v1alpha1\nkind: FleetModel\nmetadata: {name: demo}\nspec:\n"
        f"  servedModelNames: [{targets.MODEL_NAME}]\n  source: {model}\n  {count}\n"
        f"  engineArgs: {json.dumps(engine_args)}\n"
    )


@contextmanager
def fleet(name: str, args: argparse.Namespace, log_dir: Path) -> Iterator[str]:
    """``fleet up --engine sim`` with the scenario's deployment and scheduler config; its URL
    once every engine is ready."""
    split = name == "split"
    folder = log_dir / name
    (folder / "deployments").mkdir(parents=True)
    deployment = _deployment(targets.demo_model(), args.engines, args.prefill, split, args.sim_arg)
    (folder / "deployments" / "demo.yaml").write_text(deployment)
    port = targets.free_port()
    argv = [
        *(sys.executable, "-m", "fleet", "up", "--engine", "sim", "--port", str(port)),
        *("--deployments", str(folder / "deployments"), "--log-dir", str(folder / "logs")),
    ]
    if split:
        (folder / "scheduler.yaml").write_text(SPLIT_CONFIG.format(threshold=args.threshold))
        argv += ["--scheduler-config", str(folder / "scheduler.yaml")]
    proc = targets.start(f"fleet-up-{name}", argv, log_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        targets.wait_http(url, proc, timeout_s=300, path="/readyz")
        deadline = time.monotonic() + 300
        while True:
            engines = httpx.get(url + "/api/v1/engines", timeout=10).json()["engines"]
            if sum(1 for e in engines if e["state"] == "ready") == args.engines:
                break
            if time.monotonic() > deadline or proc.popen.poll() is not None:
                raise RuntimeError(f"{name}: engines not ready; logs in {folder}")
            time.sleep(0.2)
        yield url
    finally:
        proc.stop()


def pd_outcomes(url: str) -> dict[str, int]:
    """The coordinator's ``fleet_pd_requests_total`` by outcome (0 where absent)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {"split": 0, "fallback": 0, "decode_only": 0}
    for m in re.finditer(r'^fleet_pd_requests_total\{outcome="(\w+)"\} (\S+)$', text, re.M):
        out[m.group(1)] = int(float(m.group(2)))
    return out


def engine_itl_buckets(url: str) -> dict[float, float]:
    """``vllm:inter_token_latency_seconds`` cumulative buckets (le → count), summed over the
    fleet's engines, read from each engine's own ``/metrics``."""
    engines = httpx.get(url + "/api/v1/engines", timeout=10).json()["engines"]
    out: dict[float, float] = {}
    pattern = re.compile(
        r'^vllm:inter_token_latency_seconds_bucket\{[^}]*le="([^"]+)"[^}]*\} (\S+)$', re.M
    )
    for engine in engines:
        text = httpx.get(engine["url"] + "/metrics", timeout=10).text
        for m in pattern.finditer(text):
            le = float(m.group(1))
            out[le] = out.get(le, 0.0) + float(m.group(2))
    return out


def engine_itl(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """From two bucket readings: token gaps the engines saw, the share over 50 and 100 ms, and
    the bucket that holds the 99th percentile (its upper bound, ms)."""
    delta = {le: after.get(le, 0.0) - before.get(le, 0.0) for le in sorted(after)}
    total = delta.get(float("inf"), 0.0)
    if total <= 0:
        return {"gaps": 0}
    p99 = next(le for le, c in delta.items() if c >= 0.99 * total)
    return {
        "gaps": int(total),
        "over_50ms": round(1 - delta.get(0.05, 0.0) / total, 4),
        "over_100ms": round(1 - delta.get(0.1, 0.0) / total, 4),
        "p99_bucket_ms": p99 * 1000,
    }


def summarize(results: Sequence[Result], wall_s: float) -> dict[str, Any]:
    """Per class: sent, ok, TTFT and inter-token latency summaries, output tokens/s."""
    out: dict[str, Any] = {"wall_s": round(wall_s, 2)}
    for cls in (*CLASSES, "all"):
        rs = [r for r in results if cls in ("all", r.cls)]
        ok = [r for r in rs if r.status == 200 and not r.error and r.ttft_s is not None]
        out[cls] = {
            "sent": len(rs),
            "ok": len(ok),
            "errors": sorted({r.error for r in rs if r.error})[:5],
            "split_by_header": sum(1 for r in ok if r.prefill_pod),
            "ttft": summary_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
            "itl": summary_ms([g for r in ok for g in r.gaps_s]),
            "streams_with_gap_over_100ms": sum(1 for r in ok if max(r.gaps_s, default=0) > 0.1),
            "tokens_per_s": round(sum(r.tokens for r in ok) / wall_s, 1) if wall_s else 0.0,
        }
    return out


def rates(args: argparse.Namespace) -> list[float]:
    """The load levels of ``--long-rates``."""
    try:
        out = [float(x) for x in args.long_rates.split(",")]
    except ValueError:
        msg = f"--long-rates: numbers separated by commas, got {args.long_rates!r}"
        raise SystemExit(msg) from None
    if not out or any(r < 0 for r in out):
        raise SystemExit(f"--long-rates: numbers >= 0, got {args.long_rates!r}")
    return out


def run(args: argparse.Namespace, out: Path | None = None) -> dict[str, Any]:
    """Run the benchmark and write its results."""
    if not 1 <= args.prefill < args.engines:
        raise SystemExit("--prefill: must be at least 1 and below --engines")
    levels = {rate: workload(args, rate) for rate in rates(args)}
    log_dir = Path(tempfile.mkdtemp(prefix="bench-pd-"))
    result: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k not in ("run", "out")},
        "levels": [
            {"long_rate": rate, "requests": {c: sum(j.cls == c for j in jobs) for c in CLASSES}}
            for rate, jobs in levels.items()
        ],
        "runs": [],
    }
    for name in args.scenarios.split(","):
        if name not in ("unsplit", "split"):
            raise SystemExit(f"--scenarios: unknown {name!r}; choose from unsplit, split")
        with fleet(name, args, log_dir) as url:
            trio.run(drive, url, warmup(args))  # tokenizer loaded, connections open
            for rate, jobs in levels.items():
                before, buckets = pd_outcomes(url), engine_itl_buckets(url)
                results, wall = trio.run(drive, url, jobs)
                scenario = summarize(results, wall)
                scenario["engine_itl"] = engine_itl(buckets, engine_itl_buckets(url))
                after = pd_outcomes(url)
                scenario["pd_requests_total"] = {k: after[k] - before[k] for k in after}
                result["runs"].append({"fleet": name, "long_rate": rate, **scenario})
    result["logs"] = str(log_dir)
    md = markdown(result)
    folder = report.write("pd_split", result, md, out=out)
    print(md)
    print(f"\nwritten to {folder}")
    return result


def markdown(result: dict[str, Any]) -> str:
    """The result as markdown tables."""
    cfg = result["config"]
    runs = sorted(result["runs"], key=lambda r: (r["long_rate"], r["fleet"] != "unsplit"))
    rows = []
    for r in runs:
        pd = r["pd_requests_total"]
        for cls in CLASSES:
            c = r[cls]
            rows.append([
                f"{r['long_rate']:g}", r["fleet"], cls, f"{c['ok']}/{c['sent']}",
                c["ttft"].get("p50_ms", "-"), c["ttft"].get("p99_ms", "-"),
                c["itl"].get("p50_ms", "-"), c["itl"].get("p99_ms", "-"),
                c["itl"].get("max_ms", "-"),
                f"{c['streams_with_gap_over_100ms']}/{c['ok']}", c["tokens_per_s"],
                f"{pd['split']} / {pd['fallback']} / {pd['decode_only']}" if cls == "long" else "",
            ])  # fmt: skip
    roles = f"{cfg['prefill']} prefill + {cfg['engines'] - cfg['prefill']} decode"
    md = (
        f"### P/D split ({cfg['engines']} simulated engines; split: {roles}; "
        f"{cfg['duration_s']:g} s of arrivals per level: long prompts of {cfg['long_tokens']} "
        f"tokens → {cfg['long_max_tokens']} at the rate in the first column, chat streams "
        f"{cfg['chat_rate']:g}/s of ~64 → {cfg['chat_max_tokens']} tokens)\n\n"
    )
    md += report.table(
        ["long/s", "fleet", "class", "ok", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms",
         "ITL p99 ms", "ITL max ms", "streams with a gap > 100 ms", "out tok/s",
         "pd split / fallback / decode_only"],
        rows,
    )  # fmt: skip
    rows = [
        [f"{r['long_rate']:g}", r["fleet"], e.get("gaps", 0), f"{e.get('over_50ms', 0):.2%}",
         f"{e.get('over_100ms', 0):.2%}", e.get("p99_bucket_ms", "-")]
        for r in runs
        for e in [r["engine_itl"]]
    ]  # fmt: skip
    md += "\n\nToken gaps as the engines timed them (`vllm:inter_token_latency_seconds`):\n\n"
    return md + report.table(
        ["long/s", "fleet", "gaps", "over 50 ms", "over 100 ms", "p99 within (ms)"], rows
    )


__all__ = [
    "Job",
    "Result",
    "add_args",
    "drive",
    "markdown",
    "rates",
    "run",
    "summarize",
    "workload",
]
