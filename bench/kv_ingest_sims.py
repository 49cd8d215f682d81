"""``kv-ingest --source sims``: KV events from real simulated engines, through a real agent.

See :mod:`bench.kv_ingest` for what is measured and why this mode exists beside the synthetic one.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from . import report, targets

BLOCK = 32
VOCAB_LOW, VOCAB_HIGH = 3, 1000  # the demo model's ordinary token ids


def run(args: argparse.Namespace, out: Path | None = None) -> dict[str, Any]:
    """Start coordinator, agent and ``args.engines`` simulators; send; measure; stop."""
    log_dir = Path(tempfile.mkdtemp(prefix="bench-kv-sims-"))
    link = f"tcp://127.0.0.1:{targets.free_port()}"
    port, agent_port = targets.free_port(), targets.free_port()
    sim_flags = [
        "--sim-prefill-ms-per-token=0.001",
        "--sim-decode-ms-per-token=0.1",
        f"--sim-num-blocks={args.sim_num_blocks}",
    ]
    extra = ["--engine", "sim", "--max-model-len", "1024"]
    extra += [f"--engine-arg={flag}" for flag in sim_flags]
    argv = targets.coordinator_argv(
        port, link, targets.demo_model(), replicas=args.engines, extra=extra
    )
    coordinator = targets.start("coordinator", argv, log_dir)
    agent = targets.start(
        "agent",
        [
            sys.executable,
            "-m",
            "fleet",
            "agent",
            "--coordinator",
            link,
            "--node-id",
            "bench-node",
            "--http-port",
            str(agent_port),
            "--log-dir",
            str(log_dir / "engines"),
        ],
        log_dir,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        targets.wait_http(url, coordinator, path="/healthz")
        engine_urls = _wait_ready(url, args.engines, timeout_s=300)
        agent_url = f"http://127.0.0.1:{agent_port}"
        result = _measure(args, url, agent_url, engine_urls, coordinator.popen.pid, agent.popen.pid)
    finally:
        agent.stop()
        coordinator.stop()
    result["logs"] = str(log_dir)
    md = _markdown(result)
    folder = report.write("kv_ingest_sims", result, md, out=out)
    print(md)
    print(f"\nwritten to {folder}")
    return result


def _wait_ready(url: str, n: int, timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        engines = httpx.get(url + "/api/v1/engines", timeout=10).json()["engines"]
        ready = [e["url"] for e in engines if e["state"] == "ready"]
        if len(ready) == n:
            return ready
        time.sleep(0.5)
    raise RuntimeError(f"not all {n} simulated engines became ready in {timeout_s} s")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _block_events(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    found = re.findall(r'^fleet_kv_block_events_total\{type="(\w+)"\} (\S+)', text, re.M)
    return {kind: float(v) for kind, v in found}


def _sum(url: str, family: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(float(v) for v in re.findall(rf"^{family}(?:\{{[^}}]*\}})? (\S+)", text, re.M))


def _measure(
    args: argparse.Namespace,
    url: str,
    agent_url: str,
    engine_urls: list[str],
    coord_pid: int,
    agent_pid: int,
) -> dict[str, Any]:
    before = _block_events(url)
    cpu0 = (_cpu_s(coord_pid), _cpu_s(agent_pid))
    t0 = time.monotonic()
    sent = trio.run(_send, engine_urls, args)
    send_s = time.monotonic() - t0
    # Quiescence: the coordinator's counter stops moving for a second.
    last, still_since = -1.0, time.monotonic()
    while time.monotonic() - still_since < 1.0:
        now = sum(_block_events(url).values())
        if now != last:
            last, still_since = now, time.monotonic()
        time.sleep(0.1)
    elapsed = still_since - t0  # until the last event arrived
    after = _block_events(url)
    cpu1 = (_cpu_s(coord_pid), _cpu_s(agent_pid))
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in ("stored", "removed", "cleared")}
    blocks = delta["stored"] + delta["removed"]
    state = httpx.get(url + "/api/v1/cache/state", timeout=30).json()
    relayed = _sum(agent_url, "fleet_agent_kv_events_total")
    received = _sum(url, "fleet_kv_events_total")
    gaps = _sum(agent_url, "fleet_agent_kv_gaps_total")
    coord_cpu, agent_cpu = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    return {
        "source": "sims",
        "engines": len(engine_urls),
        "duration_s": round(send_s, 2),
        "requests": sent["ok"],
        "request_errors": sent["errors"],
        "block_events": int(blocks),
        "stored": int(delta["stored"]),
        "removed": int(delta["removed"]),
        "block_events_per_s": round(blocks / elapsed),
        "coordinator_cpu_s": round(coord_cpu, 2),
        "agent_cpu_s": round(agent_cpu, 2),
        "coordinator_cpu_ms_per_1k_block_events": round(1e6 * coord_cpu / blocks, 2)
        if blocks
        else None,
        "agent_cpu_ms_per_1k_block_events": round(1e6 * agent_cpu / blocks, 2) if blocks else None,
        "events_relayed_by_agent": int(relayed),
        "events_received_by_coordinator": int(received),
        "gaps_seen_by_agent": int(gaps),
        "index_entries": sum(e["blocks"] for e in state["engines"]),
        "index_distinct_blocks": state["blocks"],
        "index_stats": state.get("stats", {}),
    }


async def _send(engine_urls: list[str], args: argparse.Namespace) -> dict[str, int]:
    counts = {"ok": 0, "errors": 0}
    deadline = trio.current_time() + args.duration_s
    limits = httpx.Limits(max_connections=args.concurrency * 2)

    async def worker(client: httpx.AsyncClient, index: int) -> None:
        rng = random.Random(index)
        i = index
        while trio.current_time() < deadline:
            prompt = [
                rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(args.prompt_blocks * BLOCK)
            ]
            body = {"model": targets.MODEL_NAME, "prompt": prompt, "max_tokens": 1}
            engine = engine_urls[i % len(engine_urls)]
            i += args.concurrency
            try:
                r = await client.post(engine + "/v1/completions", json=body)
                counts["ok" if r.status_code == 200 else "errors"] += 1
            except httpx.HTTPError:
                counts["errors"] += 1

    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async with trio.open_nursery() as nursery:
            for w in range(args.concurrency):
                nursery.start_soon(worker, client, w)
    return counts


def _markdown(r: dict[str, Any]) -> str:
    rows = [
        ["simulated engines (own processes) → 1 agent → coordinator", r["engines"]],
        ["requests sent straight to the engines", f"{r['requests']} in {r['duration_s']} s"],
        ["block events (stored + removed) absorbed", f"{r['stored']} + {r['removed']}"],
        ["block events / s end to end (limited by the simulators)", r["block_events_per_s"]],
        ["coordinator CPU ms per 1,000 block events", r["coordinator_cpu_ms_per_1k_block_events"]],
        ["agent CPU ms per 1,000 block events", r["agent_cpu_ms_per_1k_block_events"]],
        [
            "KV events relayed by the agent / received by the coordinator",
            f"{r['events_relayed_by_agent']} / {r['events_received_by_coordinator']}",
        ],
        ["sequence gaps the agent saw (engine → agent)", r["gaps_seen_by_agent"]],
        ["indexed (block, engine) entries at the end", r["index_entries"]],
    ]
    return "### KV-event ingest from running simulators\n\n" + report.table(
        ["measure", "value"], rows
    )


__all__ = ["run"]
