"""Proxy CPU: a router's CPU ms per plain request and per streamed answer, Fleet and vllm-router.

One fast stub engine (:mod:`fleet.bench.stub_engine`, its own process: answers at once, a stream
as ``--tokens`` SSE events) is launched and registered by a real Fleet agent
(:class:`fleet.agent.service.Agent`, its launch module pointed at the stub) over the real agent
link to a real ``fleet coordinator`` (its own process); vllm-router (``round_robin``, from
``bench/.peers-venv``) is pointed at the same stub. For each router, after a warm-up, a
closed-loop load (:mod:`fleet.bench.cpuload`, its own process) keeps C requests in flight
for ``--seconds``: plain completions at ``--plain-concurrency``, streams at each of
``--stream-concurrency`` (16 and 256). The router process's CPU time (``/proc/PID/stat``: user +
system, all threads, live children) before and after, over the requests sent, is its CPU ms
per request; its idle CPU rate (ms/s, measured first) is reported too. Issue 16's targets:
Fleet ≤ 0.5 ms plain, ≤ 1.0 ms per stream, and stream@256 ≤ 1.5 × stream@16.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import trio

from . import machineprobe, report, targets
from .cpuload import Load, cpu_s, run_load

STUB_MODULE = "fleet.bench.stub_engine"
TARGETS = ("fleet", "vllm-router")
TARGET_PLAIN_MS, TARGET_STREAM_MS, TARGET_RATIO = 0.5, 1.0, 1.5


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=10.0, help="load per router and mode")
    p.add_argument("--warmup-s", type=float, default=2.0, help="load before measuring")
    p.add_argument("--idle-s", type=float, default=3.0, help="idle CPU sampled this long")
    p.add_argument("--tokens", type=int, default=16, help="tokens per answer (max_tokens)")
    p.add_argument("--plain-concurrency", type=int, default=16)
    p.add_argument(
        "--stream-concurrency", default="16,256", help="comma-separated stream concurrencies"
    )
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset")
    p.add_argument(
        "--loadgen",
        choices=("python", "wrk"),
        default="python",
        help="python (exact counts, the default) or wrk (cuts requests at its deadline)",
    )


def run(args: argparse.Namespace, out: Path | None = None) -> dict[str, Any]:
    """Start stub, agent, coordinator and peers; load each router; write the results."""
    wanted = [t for t in TARGETS if t in set(args.targets.split(","))]
    unknown = set(args.targets.split(",")) - set(TARGETS)
    if unknown or not wanted:
        raise SystemExit(f"--targets: unknown {sorted(unknown)}; choose from {TARGETS}")
    streams = [int(c) for c in args.stream_concurrency.split(",")]
    log_dir = Path(tempfile.mkdtemp(prefix="bench-proxy-cpu-"))
    cfg = {k: v for k, v in vars(args).items() if k not in ("run", "out")}
    result: dict[str, Any] = {
        "config": cfg,
        "load_average": list(os.getloadavg()),
        "machine": {"start": machineprobe.probe()},
        "runs": [],
    }
    with contextlib.ExitStack() as stack:
        fleet_url, engine_url, coord_pid = stack.enter_context(_fleet(log_dir))
        routers: dict[str, tuple[str, int]] = {}
        if "fleet" in wanted:
            routers["fleet"] = (fleet_url, coord_pid)
        if "vllm-router" in wanted:
            url = stack.enter_context(targets.vllm_router([engine_url], log_dir, "round_robin"))
            routers["vllm-router"] = (url, _pid_listening(url))
        for name, (url, pid) in routers.items():
            _check_answers(url, args.tokens)
            result["runs"].extend(_measure(args, name, url, pid, streams))
    result["load_average_after"] = list(os.getloadavg())
    result["machine"]["end"] = machineprobe.probe()
    result["logs"] = str(log_dir)
    result["summary"] = _summary(result["runs"], streams)
    md = _markdown(result)
    folder = report.write("proxy_cpu", result, md, out=out)
    print(md)
    print(f"\nwritten to {folder}")
    return result


def _body(args: argparse.Namespace, stream: bool) -> bytes:
    body: dict[str, Any] = {"model": targets.MODEL_NAME, "prompt": "Hello from the benchmark"}
    body |= {"max_tokens": args.tokens, "temperature": 0}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


def _measure(
    args: argparse.Namespace, name: str, url: str, pid: int, streams: list[int]
) -> list[dict[str, Any]]:
    path = url + "/v1/completions"
    modes = [("plain", args.plain_concurrency)] + [("stream", c) for c in streams]
    for stream in (False, True):  # warm-up: pools, caches, first-request paths
        _load(args, path, stream, max(streams), args.warmup_s)
    time.sleep(0.5)
    cpu0, t0 = cpu_s(pid), time.monotonic()
    time.sleep(args.idle_s)
    idle_ms_per_s = (cpu_s(pid) - cpu0) * 1000 / (time.monotonic() - t0)
    rows = []
    for mode, conc in modes:
        stream = mode == "stream"
        before = cpu_s(pid)
        load = _load(args, path, stream, conc, args.seconds)
        time.sleep(0.2)  # requests cut at wrk's deadline finish in the router
        cpu = cpu_s(pid) - before
        sent = max(load.sent, 1)
        net = max(cpu - idle_ms_per_s * (load.wall_s + 0.2) / 1000, 0.0)
        row = {
            "router": name, "mode": mode, "concurrency": conc, "generator": load.generator,
            "sent": load.sent, "ok": load.ok, "bad": load.bad, "seconds": load.wall_s,
            "requests_per_s": round(load.ok / load.wall_s, 1), "cpu_s": round(cpu, 3),
            "cpu_ms_per_request": round(cpu * 1000 / sent, 3),
            "cpu_ms_per_request_net_of_idle": round(net * 1000 / sent, 3),
            "idle_cpu_ms_per_s": round(idle_ms_per_s, 2),
        }  # fmt: skip
        print(row, flush=True)
        rows.append(row)
    return rows


def _load(args: argparse.Namespace, path: str, stream: bool, conc: int, seconds: float) -> Load:
    return run_load(path, _body(args, stream), stream=stream, min_events=args.tokens + 1,
                    connections=conc, seconds=seconds, generator=args.loadgen)  # fmt: skip


def _summary(runs: list[dict[str, Any]], streams: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for router in dict.fromkeys(r["router"] for r in runs):  # in the order measured
        mine = {(r["mode"], r["concurrency"]): r["cpu_ms_per_request"] for r in runs
                if r["router"] == router}  # fmt: skip
        plain = next(v for (m, _), v in mine.items() if m == "plain")
        per_stream = {c: mine[("stream", c)] for c in streams}
        low, high = min(streams), max(streams)
        ratio = round(per_stream[high] / per_stream[low], 2) if per_stream[low] else None
        out[router] = {"plain_ms": plain, "stream_ms": per_stream, "stream_ratio": ratio,
                       "ratio_of": f"stream@{high} / stream@{low}"}  # fmt: skip
        if router == "fleet":
            out[router]["meets"] = {
                f"plain <= {TARGET_PLAIN_MS} ms": plain <= TARGET_PLAIN_MS,
                f"stream@{low} <= {TARGET_STREAM_MS} ms": per_stream[low] <= TARGET_STREAM_MS,
                f"ratio <= {TARGET_RATIO}": ratio is not None and ratio <= TARGET_RATIO,
            }
    return out


def _check_answers(url: str, tokens: int) -> None:
    """One plain and one streamed answer through the router, checked whole."""
    body = {"model": targets.MODEL_NAME, "prompt": "check", "max_tokens": tokens}
    plain = httpx.post(url + "/v1/completions", json=body, timeout=30)
    if plain.status_code != 200 or not plain.json().get("choices"):
        raise RuntimeError(f"{url}: plain answer {plain.status_code}: {plain.text[:500]}")
    streamed = httpx.post(url + "/v1/completions", json=body | {"stream": True}, timeout=30)
    events = [ln for ln in streamed.text.splitlines() if ln.startswith("data: ")]
    if streamed.status_code != 200 or events[-1:] != ["data: [DONE]"] or len(events) < tokens + 1:
        raise RuntimeError(f"{url}: stream answer {streamed.status_code}: {streamed.text[:500]}")


def _pid_listening(url: str) -> int:
    """The pid of the process that listens on ``url``'s port (a peer started through a
    launcher script may not be the process :func:`targets.start` returned)."""
    port = int(url.rsplit(":", 1)[1])
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(cols[9])
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(pid)
    raise RuntimeError(f"no process found listening on {url}")


@contextlib.contextmanager
def _fleet(log_dir: Path) -> Iterator[tuple[str, str, int]]:
    """A coordinator and an agent (each its own process) running one stub engine; yields the
    coordinator's URL, the stub's URL and the coordinator's pid."""
    link = f"tcp://127.0.0.1:{targets.free_port()}"
    port, agent_port = targets.free_port(), targets.free_port()
    extra = ["--engine", "vllm", "--max-model-len", "1024"]
    argv = targets.coordinator_argv(port, link, targets.demo_model(), replicas=1, extra=extra)
    coordinator = targets.start("coordinator", argv, log_dir)
    code = "from fleet.bench.proxy_cpu import agent_main; agent_main()"
    agent_argv = [sys.executable, "-c", code, link, str(agent_port), str(log_dir / "engines")]
    agent = targets.start("agent", agent_argv, log_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        targets.wait_http(url, coordinator, path="/healthz")
        deadline = time.monotonic() + 120
        while True:
            engines = httpx.get(url + "/api/v1/engines", timeout=10).json()["engines"]
            ready = [e["url"] for e in engines if e["state"] == "ready"]
            if ready:
                break
            if time.monotonic() > deadline or agent.popen.poll() is not None:
                raise RuntimeError(f"the stub engine did not become ready: {engines}")
            time.sleep(0.2)
        targets.wait_http(url, coordinator, path="/readyz")
        yield url, ready[0], coordinator.popen.pid
    finally:
        agent.stop()
        coordinator.stop()


def agent_main() -> None:
    """``python -c``: LINK HTTP_PORT LOG_DIR: a Fleet agent whose engines are stubs; SIGTERM
    stops it (its engines with it)."""
    from fleet.agent.launcher import LaunchConfig
    from fleet.agent.service import Agent, AgentConfig

    link, http_port, engine_logs = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = AgentConfig(node_id="bench-node", coordinator_endpoint=link, http_port=http_port,
                      log_dir=engine_logs, launch=LaunchConfig(module=STUB_MODULE))  # fmt: skip

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Agent(cfg).run)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    return

    trio.run(main)


def _markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    md = (
        f"### Proxy CPU (one stub engine answering at once, {cfg['tokens']}-token answers, "
        f"{cfg['seconds']:g} s of closed-loop load per row)\n\n"
    )
    rows = [
        [r["router"], r["mode"], r["concurrency"], f"{r['ok']}/{r['sent']}", r["requests_per_s"],
         r["cpu_ms_per_request"], r["cpu_ms_per_request_net_of_idle"], r["idle_cpu_ms_per_s"]]
        for r in result["runs"]
    ]  # fmt: skip
    md += report.table(
        ["router", "mode", "in flight", "ok/sent", "req/s", "CPU ms/req",
         "CPU ms/req net of idle", "idle CPU ms/s"],
        rows,
    )  # fmt: skip
    md += "\n\n"
    for router, s in result["summary"].items():
        md += f"- {router}: plain {s['plain_ms']} ms, streams " + ", ".join(
            f"@{c}: {v} ms" for c, v in s["stream_ms"].items()
        )
        md += f"; {s['ratio_of']} = {s['stream_ratio']}"
        if "meets" in s:
            md += (
                " (targets: "
                + ", ".join(f"{k} {'yes' if ok else 'NO'}" for k, ok in s["meets"].items())
                + ")"
            )
        md += "\n"
    load = ", ".join(f"{x:.2f}" for x in result["load_average"])
    md += f"\nLoad average at the start: {load} ({os.cpu_count()} CPUs).\n"
    if "machine" in result:
        md += "\n" + machineprobe.line(result["machine"]["start"], result["machine"]["end"])
    return md


__all__ = ["add_args", "agent_main", "run"]
