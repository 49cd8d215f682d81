"""Proxy overhead: the same workload direct to engines, through Fleet, through vllm-router and
through sglang-router.

All in one run, on the same simulated engines (fast latency settings, so the proxies and not the
engines are what differs): ``fleet up --engine sim`` starts the engines and the coordinator;
vllm-router and sglang-router (Rust, PyPI), both ``round_robin``, are pointed at those same
engines (which also serve the model as ``unknown``, as sglang-router needs); "direct" sends to
the engines themselves, spread round-robin by the client. "trio-floor" is a minimal proxy on
trio with none of Fleet's work (:mod:`.trio_floor`): what a Python hop itself costs here.

1. Latency under load: an open-loop Poisson schedule at ``--rate`` requests/s, identical for
   every target (non-streaming completions, and streaming for time to first token). Reported:
   p50/p99, and what each proxy adds over direct. The schedule is cut into ``--rounds``
   slices and each slice goes to every target in turn (the order rotating), so the machine's
   slow periods fall on every target alike; the added p50 of each round is reported too.
2. Max sustained throughput: ``wrk`` (C, closed loop, ``--connections``) for ``--wrk-seconds``
   per run, ``--rounds`` runs per target alternated, where wrk is installed
   (``apt-get install wrk``); the median run stands for the target; one coordinator process.

Each proxy's CPU time over its own latency slices, from ``/proc/PID/stat``, divided by its
requests: proxy CPU ms per request (for Fleet the ``fleet up`` process, coordinator and agent,
whose share at rest is a few heartbeats; its engines are separate processes; a peer with the
processes it started), and its involuntary context switches likewise. ``--targets``
picks a subset (``direct`` always runs: the others are compared with it). ``--isolate`` pins
the proxies to a CPU of their own, and everything else to the others (:mod:`.affinity`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import re
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import trio

from . import affinity, machineprobe, report, targets
from .loadgen import Request, Sample, open_loop, poisson_schedule
from .stats import summary_ms

FAST_SIM = ("--sim-prefill-ms-per-token=0", "--sim-decode-ms-per-token=0.05")
TARGETS = ("direct", "fleet", "trio-floor", "vllm-router", "sglang-router")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--rate", type=float, default=100.0, help="open-loop requests/s")
    p.add_argument("--requests", type=int, default=2000, help="requests per target and mode")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--connections", type=int, default=64, help="wrk connections")
    p.add_argument("--wrk-seconds", type=int, default=5, help="per wrk run")
    p.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="latency and wrk runs alternate targets this many times (the machine's noise "
        "drifts: each target gets a share of every period)",
    )
    p.add_argument(
        "--sim-arg",
        action="append",
        default=None,
        help=f"simulator flag (repeatable; default {' '.join(FAST_SIM)})",
    )
    p.add_argument(
        "--isolate",
        action="store_true",
        help="pin the proxies to the last CPU and the engines, load generator and wrk to the "
        "others (a router's own cores, as in production: bench/affinity.py)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help="comma-separated subset (direct always runs; the peers install on first use)",
    )


def run(args: argparse.Namespace, out: Path | None = None) -> dict[str, Any]:
    """Run the benchmark and write its results."""
    sim_args = tuple(args.sim_arg) if args.sim_arg else FAST_SIM
    log_dir = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    result: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k not in ("run", "out")},
        "machine": {"start": machineprobe.probe()},
    }
    # the engines also answer to "unknown": sglang-router routes nothing else to vLLM
    engine_args = (*sim_args, "--served-model-name", *targets.SGLANG_NAMES)
    wanted = set(args.targets.split(",")) | {"direct"}
    unknown = wanted - set(TARGETS)
    if unknown:
        raise SystemExit(f"--targets: unknown {sorted(unknown)}; choose from {TARGETS}")
    # each proxy's process: ``fleet up`` alone (its engines are its children), a peer with
    # whatever it started
    procs: dict[str, Proxy] = {}
    with contextlib.ExitStack() as stack:
        fleet_pids: list[int] = []
        fleet_url, engine_urls = stack.enter_context(
            targets.fleet_up(args.engines, log_dir, engine_args, pids=fleet_pids)
        )
        urls = {"direct": engine_urls}
        if "fleet" in wanted:
            urls["fleet"] = [fleet_url]
            procs["fleet"] = Proxy(fleet_pids[0], tree=False)
        peers: dict[str, Callable[[list[int]], contextlib.AbstractContextManager[str]]] = {
            "trio-floor": lambda pids: targets.trio_floor(engine_urls, log_dir, pids=pids),
            "vllm-router": lambda pids: targets.vllm_router(
                engine_urls, log_dir, "round_robin", pids=pids
            ),
            "sglang-router": lambda pids: targets.sglang_router(
                engine_urls, log_dir, "round_robin", pids=pids
            ),
        }
        for name, started in peers.items():
            if name in wanted:
                pids: list[int] = []
                urls[name] = [stack.enter_context(started(pids))]
                procs[name] = Proxy(pids[0], tree=True)
        if args.isolate:
            result["isolation"] = _isolate(procs.values())
        result["latency"] = _latency(args, urls, procs)
        result["throughput"] = _throughput(args, urls)
    result["machine"]["end"] = machineprobe.probe()
    result["logs"] = str(log_dir)
    samples_by = result["latency"].pop("_samples")
    md = _markdown(result)
    folder = report.write("proxy_overhead", result, md, out=out)
    series = {
        f"{name} ({mode})": [s.latency_s * 1000 for s in samples]
        for (name, mode), samples in samples_by.items()
    }
    report.cdf_png(
        folder / "latency_cdf.png",
        series,
        xlabel="latency (ms)",
        title="Proxy overhead: latency CDF at the same offered load",
    )
    print(md)
    print(f"\nwritten to {folder}")
    return result


@dataclasses.dataclass(frozen=True)
class Proxy:
    """A proxy's process: its ``pid``, and whether the processes it started are its (``tree``;
    not for ``fleet up``, whose children are the engines)."""

    pid: int
    tree: bool

    def pids(self) -> list[int]:
        out, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            if self.tree:
                todo.extend(affinity.children(pid))
        return out

    def cpu_s(self) -> float:
        return sum(_cpu_s(pid) for pid in self.pids())

    def preempted(self) -> int:
        return sum(_preempted(pid) for pid in self.pids())


def _isolate(proxies: Iterable[Proxy]) -> dict[str, list[int]]:
    """Pin this process (the load generator, and wrk after it) and every process it started
    to all CPUs but the last, then the proxies to the last: the ``fleet up`` process's own
    threads (coordinator and agent; its engines stay), each peer router with its children."""
    mine, others = affinity.split_cpus()
    affinity.pin(os.getpid(), others, tree=True)
    for proxy in proxies:
        affinity.pin(proxy.pid, mine, tree=proxy.tree)
    return {"proxy_cpus": sorted(mine), "other_cpus": sorted(others)}


def _workload(args: argparse.Namespace, stream: bool) -> list[Request]:
    body: dict[str, Any] = {
        "model": targets.MODEL_NAME,
        "prompt": "Hello from the benchmark",
        "max_tokens": args.max_tokens,
        "temperature": 0,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return [Request("/v1/completions", body)] * args.requests


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (its threads, not its children;
    0 once it has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _preempted(pid: int) -> int:
    """Involuntary context switches of process ``pid``'s threads so far (the kernel took the
    CPU from it while it could run: another process woke and ran in its place)."""
    total = 0
    for task in affinity.threads(pid):
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith("nonvoluntary_ctxt_switches:"):
                        total += int(line.split(":")[1])
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return total


def _latency(
    args: argparse.Namespace, urls: dict[str, list[str]], procs: dict[str, Proxy]
) -> dict[str, Any]:
    """Each mode's requests in ``args.rounds`` slices of the schedule; every slice goes to each
    target in turn (the order rotating by round), so slow periods of the machine fall on all.
    Each proxy's CPU and preemptions are counted over its own slices."""
    schedule = poisson_schedule(args.requests, args.rate, args.seed)
    slices = round_slices(schedule, args.rounds)
    names = list(urls)
    out: dict[str, Any] = {}
    samples_by: dict[tuple[str, str], list[Sample]] = {}
    for stream in (False, True):
        mode = "stream" if stream else "plain"
        requests = _workload(args, stream)
        samples = {name: list[Sample]() for name in names}
        round_p50: dict[str, list[float]] = {name: [] for name in names}
        cpu_s = dict.fromkeys(procs, 0.0)
        preempted = dict.fromkeys(procs, 0)
        for r, (a, b, sched) in enumerate(slices):
            for name in rotated(names, r):
                proc = procs.get(name)
                if proc is not None:
                    cpu_before, preempted_before = proc.cpu_s(), proc.preempted()
                got = trio.run(_spread, urls[name], requests[a:b], sched)
                if proc is not None:
                    cpu_s[name] += proc.cpu_s() - cpu_before
                    preempted[name] += proc.preempted() - preempted_before
                samples[name] += got
                p50 = summary_ms([s.latency_s for s in got if s.ok]).get("p50_ms")
                if p50 is not None:
                    round_p50[name].append(p50)
        for name in names:
            got = samples[name]
            samples_by[(name, mode)] = got
            ok = [s for s in got if s.ok]
            out[f"{name}/{mode}"] = {
                "sent": len(got),
                "ok": len(ok),
                "errors": len(got) - len(ok),
                "latency": summary_ms([s.latency_s for s in ok]),
                "ttft": summary_ms([s.ttft_s for s in ok if s.ttft_s is not None]),
                "round_p50_ms": round_p50[name],
            }
            if name in procs:
                out[f"{name}/{mode}"]["proxy_cpu_ms_per_request"] = round(
                    cpu_s[name] * 1000 / len(got), 3
                )
                out[f"{name}/{mode}"]["proxy_preempted_per_request"] = round(
                    preempted[name] / len(got), 3
                )
    out["_samples"] = samples_by
    return out


def round_slices(schedule: list[float], rounds: int) -> list[tuple[int, int, list[float]]]:
    """``schedule`` (send times from 0) cut into ``rounds`` near-equal slices (at least 1, at
    most one per request): each slice's (start, end) indices and its times from 0."""
    n = max(1, min(rounds, len(schedule)))
    bounds = [len(schedule) * i // n for i in range(n + 1)]
    return [(a, b, [t - schedule[a] for t in schedule[a:b]]) for a, b in itertools.pairwise(bounds)]


def rotated(names: list[str], r: int) -> list[str]:
    """``names`` in round ``r``'s order: each round starts one further along."""
    k = r % len(names)
    return names[k:] + names[:k]


def added_by_round(target: list[float], direct: list[float]) -> str:
    """What a target added to direct's p50 in each round: "median (min..max)" ms."""
    added = [t - d for t, d in zip(target, direct, strict=False)]
    if not added:
        return "-"
    return f"{statistics.median(added):.2f} ({min(added):.2f}..{max(added):.2f})"


async def _spread(bases: list[str], requests: list[Request], schedule: list[float]) -> list[Sample]:
    """Send to several base URLs round-robin (the 'direct' target), each with its own client."""
    if len(bases) == 1:
        return await open_loop(bases[0], requests, schedule)
    results: list[Sample] = []
    cycle = itertools.cycle(range(len(bases)))
    parts: list[tuple[list[Request], list[float]]] = [([], []) for _ in bases]
    for req, at in zip(requests, schedule, strict=True):
        i = next(cycle)
        parts[i][0].append(req)
        parts[i][1].append(at)

    async def one(base: str, reqs: list[Request], sched: list[float]) -> None:
        results.extend(await open_loop(base, reqs, sched))

    async with trio.open_nursery() as nursery:
        for base, (reqs, sched) in zip(bases, parts, strict=True):
            nursery.start_soon(one, base, reqs, sched)
    return results


def _throughput(args: argparse.Namespace, urls: dict[str, list[str]]) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    if wrk is None:
        return {"skipped": "wrk is not installed (apt-get install wrk)"}
    script = Path(tempfile.mkdtemp()) / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f'wrk.body = \'{{"model": "{targets.MODEL_NAME}", "prompt": "Hello", '
        f'"max_tokens": {args.max_tokens}, "temperature": 0}}\'\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in urls}
    names = list(urls)
    for r in range(max(1, args.rounds)):
        for name in rotated(names, r):
            # "direct" is one engine: the proxies spread over all engines, so theirs is the
            # number to compare with direct × engines.
            proc = subprocess.run(
                [
                    wrk,
                    "-t2",
                    f"-c{args.connections}",
                    f"-d{args.wrk_seconds}s",
                    "--latency",
                    "-s",
                    str(script),
                    urls[name][0] + "/v1/completions",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            runs[name].append(_parse_wrk(proc.stdout))
    out: dict[str, Any] = {}
    for name, results in runs.items():
        # The run with the median rate stands for the target; every run's rate is kept.
        ranked = sorted(results, key=lambda x: float(x["requests_per_s"]))
        out[name] = ranked[(len(ranked) - 1) // 2] | {
            "engines_behind": 1 if name == "direct" else len(urls["direct"]),
            "runs_requests_per_s": [x["requests_per_s"] for x in results],
        }
    return out


def _parse_wrk(text: str) -> dict[str, Any]:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = re.search(r"Socket errors: (.*)", text)
    lat = {
        q: m.group(1)
        for q in ("50%", "99%")
        if (m := re.search(rf"^\s+{re.escape(q)}\s+(\S+)", text, re.M))
    }
    return {
        "requests_per_s": float(rps.group(1)) if rps else 0.0,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(1) if errors else "",
        "latency_p50": lat.get("50%", ""),
        "latency_p99": lat.get("99%", ""),
    }


def _markdown(result: dict[str, Any]) -> str:
    lat = result["latency"]
    rows = []
    for key, r in lat.items():
        if key.startswith("_"):
            continue
        name, mode = key.split("/")
        direct = lat[f"direct/{mode}"]["latency"]
        added50 = r["latency"].get("p50_ms", 0) - direct.get("p50_ms", 0)
        added99 = r["latency"].get("p99_ms", 0) - direct.get("p99_ms", 0)
        spread = added_by_round(r["round_p50_ms"], lat[f"direct/{mode}"]["round_p50_ms"])
        rows.append(
            [
                name,
                mode,
                f"{r['ok']}/{r['sent']}",
                r["latency"].get("p50_ms"),
                r["latency"].get("p99_ms"),
                r["ttft"].get("p50_ms", "-"),
                "-" if name == "direct" else round(added50, 2),
                "-" if name == "direct" else spread,
                "-" if name == "direct" else round(added99, 2),
                r.get("proxy_cpu_ms_per_request", "-"),
                r.get("proxy_preempted_per_request", "-"),
            ]
        )
    cfg = result["config"]
    md = (
        f"### Proxy overhead ({cfg['engines']} simulated engines, open loop at {cfg['rate']} "
        f"req/s, {cfg['requests']} requests per target and mode in {cfg['rounds']} alternated "
        "rounds)\n\n"
    )
    if "isolation" in result:
        iso = result["isolation"]
        md += (
            f"Isolated (`--isolate`): the proxies on CPU {iso['proxy_cpus']}, the engines, "
            f"the load generator and wrk on CPU {iso['other_cpus']}.\n\n"
        )
    md += report.table(
        [
            "target",
            "mode",
            "ok",
            "p50 ms",
            "p99 ms",
            "TTFT p50 ms",
            "added p50 ms",
            "added p50 ms by round: median (min..max)",
            "added p99 ms",
            "proxy CPU ms/req",
            "proxy preempted /req",
        ],
        rows,
    )
    md += (
        "\n\n*proxy CPU ms/req*: the proxy's CPU time over its own slices per request (at "
        "this rate mostly a cold CPU's cost, several times what the same work costs under "
        "load). *proxy preempted /req*: its involuntary context switches per request (the "
        "kernel gave its CPU to another runnable process: an engine, the client, the other "
        "proxies' idle work); each one stalls every request it holds until it runs again."
    )
    thr = result["throughput"]
    if "skipped" in thr:
        md += f"\n\nMax throughput: {thr['skipped']}"
    else:
        rows = [
            [
                n,
                r["engines_behind"],
                r["requests_per_s"],
                ", ".join(f"{x:,.0f}" for x in r["runs_requests_per_s"]),
                r["latency_p50"],
                r["latency_p99"],
                r["non_2xx"],
            ]
            for n, r in thr.items()
        ]
        md += (
            f"\n\nMax sustained throughput (wrk, {cfg['connections']} connections, "
            f"{cfg['wrk_seconds']} s per run, {cfg['rounds']} alternated runs per target; the "
            "median run's figures):\n\n"
        )
        md += report.table(
            ["target", "engines", "req/s", "every run's req/s", "p50", "p99", "non-2xx"], rows
        )
    if "machine" in result:
        md += "\n\n" + machineprobe.line(result["machine"]["start"], result["machine"]["end"])
    return md


__all__ = ["add_args", "added_by_round", "rotated", "round_slices", "run"]
