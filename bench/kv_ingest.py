"""KV-event ingest: how fast one coordinator process absorbs KV events, and what the index costs.

Setup: a real ``fleet coordinator`` process; this process plays 64 nodes with one engine each,
over 64 real ZMQ DEALER sockets speaking Fleet's agent protocol (Register, then KVEventBatch).
Batches carry BlockStored events chained the way a vLLM engine chains them (parent hash, 32 token
ids per block); each engine stores ``blocks_per_engine`` blocks. Frames are encoded before the
clock starts, so the sender is not the bottleneck; the coordinator's own counter
(``fleet_kv_events_total``) says when everything was absorbed.

Reported: block events absorbed per second (the coordinator is one trio thread: per core),
batches per second, the coordinator's resident memory before and after, and bytes per indexed
(block, engine) entry.

``--source sims`` measures the whole real path instead: a ``fleet coordinator`` and a
``fleet agent`` process, the agent running ``--engines`` simulated engines (each its own process,
publishing vLLM's KV events on ZMQ to the agent's relay, which forwards them over the agent link).
Requests with random prompts go straight to the engines for ``--duration-s`` (so the proxy's CPU
is not in the figure), engines small enough (``--sim-num-blocks``) to evict, so BlockRemoved flows
too. On 2 cores the simulators, not the coordinator, are the limit; what this mode reports is the
rate that flowed end to end, the coordinator's and the agent's CPU seconds per 1,000 block events
(from /proc), and whether every event arrived (the engines' stored-block counts against the
coordinator's counter).
"""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import zmq

from fleet.protocol import codec
from fleet.protocol.kvevents import BlockStored
from fleet.protocol.messages import EngineStatus, KVEventBatch, Register

from . import report, targets

BLOCK = 32


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--source",
        choices=["synthetic", "sims"],
        default="synthetic",
        help="synthetic agent links (saturates the coordinator), or real simulators and agent",
    )
    p.add_argument("--engines", type=int, default=64)
    p.add_argument("--duration-s", type=float, default=30.0, help="sims: how long to send")
    p.add_argument("--prompt-blocks", type=int, default=8, help="sims: blocks per prompt")
    p.add_argument("--concurrency", type=int, default=32, help="sims: requests in flight")
    p.add_argument("--sim-num-blocks", type=int, default=256, help="sims: KV blocks per engine")
    p.add_argument("--blocks-per-engine", type=int, default=16384)  # 64 × 16384 ≈ 1M entries
    p.add_argument("--blocks-per-event", type=int, default=16)
    p.add_argument(
        "--shared-prefix-blocks",
        type=int,
        default=8,
        help="leading blocks every sequence of an engine shares (a system prompt)",
    )
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace, out: Path | None = None) -> dict[str, Any]:
    """Run the benchmark and write its results."""
    if args.source == "sims":
        from . import kv_ingest_sims

        return kv_ingest_sims.run(args, out)
    coordinator, http_url, link = _start_coordinator()
    try:
        result = _measure(args, http_url, link, coordinator.pid)
    finally:
        coordinator.terminate()
        coordinator.wait(timeout=30)
    md = _markdown(result)
    folder = report.write("kv_ingest", result, md, out=out)
    print(md)
    print(f"\nwritten to {folder}")
    return result


def _start_coordinator() -> tuple[subprocess.Popen[str], str, str]:
    port = _free_port()
    link = f"tcp://127.0.0.1:{_free_port()}"
    model = Path(__file__).resolve().parent / "results" / "no-model"
    proc = subprocess.Popen(
        targets.coordinator_argv(port, link, model, replicas=0),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url, link
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("coordinator did not start")


def _batches(args: argparse.Namespace, engine: int) -> list[list[bytes]]:
    """Pre-encoded KV batches for one engine: sequences sharing a prefix, chained by hash."""
    shared = random.Random(args.seed)  # every engine serves the same system prompt
    prefix = [shared.randrange(2048) for _ in range(args.shared_prefix_blocks * BLOCK)]
    rng = random.Random(args.seed * 1000 + engine + 1)
    base = engine << 40  # this engine's own block hashes: opaque, unique per engine
    frames: list[list[bytes]] = []
    seq = 0
    stored = 0
    while stored < args.blocks_per_engine:
        parent: int | None
        if seq == 0:  # the shared prefix, stored once
            n = min(args.shared_prefix_blocks, args.blocks_per_engine)
            tokens, parent = prefix[: n * BLOCK], None
        else:  # a sequence continuing the prefix with blocks of its own
            n = min(args.blocks_per_event, args.blocks_per_engine - stored)
            tokens = [rng.randrange(2048) for _ in range(n * BLOCK)]
            parent = base + args.shared_prefix_blocks - 1
        hashes = tuple(range(base + stored, base + stored + n))
        event = BlockStored(hashes, parent, tuple(tokens), BLOCK, None, "GPU")
        batch = KVEventBatch(
            node_id=f"n{engine}",
            engine_id=f"e{engine}",
            seq=seq,
            ts=time.time(),
            events=(event,),
            model="demo",
        )
        frames.append(codec.encode(batch))
        seq += 1
        stored += n
    return frames


def _measure(args: argparse.Namespace, url: str, link: str, pid: int) -> dict[str, Any]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    socks = []
    for i in range(args.engines):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, f"n{i}".encode())
        sock.setsockopt(zmq.SNDHWM, 1_000_000)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(link)
        engine = EngineStatus(
            engine_id=f"e{i}",
            model="demo",
            url=f"http://127.0.0.1:1/{i}",
            state="ready",
            block_size=BLOCK,
        )
        sock.send_multipart(codec.encode(Register(f"n{i}", "", "bench", (), (engine,))))
        socks.append(sock)
    encode_t0 = time.perf_counter()
    per_engine = [_batches(args, i) for i in range(args.engines)]
    encode_s = time.perf_counter() - encode_t0
    total_batches = sum(len(b) for b in per_engine)
    total_blocks = args.engines * args.blocks_per_engine
    _wait_engines(url, args.engines)
    rss_before = _rss(pid)
    t0 = time.perf_counter()
    # Interleave engines the way concurrent traffic would.
    for i in range(max(len(b) for b in per_engine)):
        for sock, batches in zip(socks, per_engine, strict=True):
            if i < len(batches):
                sock.send_multipart(batches[i])
    sent_s = time.perf_counter() - t0
    blocks = _wait_absorbed(url, total_batches)
    elapsed = time.perf_counter() - t0
    rss_after = _rss(pid)
    for sock in socks:
        sock.close()
    entries = blocks["entries"]
    return {
        "engines": args.engines,
        "blocks_per_engine": args.blocks_per_engine,
        "blocks_per_event": args.blocks_per_event,
        "batches": total_batches,
        "block_events": total_blocks,
        "send_s": round(sent_s, 3),
        "absorb_s": round(elapsed, 3),
        "block_events_per_s": round(total_blocks / elapsed),
        "batches_per_s": round(total_batches / elapsed),
        "index_distinct_blocks": blocks["distinct"],
        "index_entries": entries,
        "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_after_mb": round(rss_after / 2**20, 1),
        "bytes_per_entry": round((rss_after - rss_before) / max(entries, 1), 1),
        "pre_encode_s": round(encode_s, 2),
    }


def _wait_engines(url: str, n: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if len(httpx.get(url + "/api/v1/engines").json()["engines"]) >= n:
            return
        time.sleep(0.1)
    raise RuntimeError("engines did not register")


def _wait_absorbed(url: str, batches: int) -> dict[str, int]:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        text = httpx.get(url + "/metrics", timeout=30).text
        seen = sum(
            float(v) for v in re.findall(r"^fleet_kv_batches_total\{[^}]*\} (\S+)", text, re.M)
        )
        if seen >= batches:
            state = httpx.get(url + "/api/v1/cache/state", timeout=30).json()
            entries = sum(e["blocks"] for e in state["engines"])
            return {"distinct": state["blocks"], "entries": entries}
        time.sleep(0.05)
    raise RuntimeError("coordinator did not absorb every batch in 600 s")


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _markdown(r: dict[str, Any]) -> str:
    rows = [
        ["engines × blocks", f"{r['engines']} × {r['blocks_per_engine']}"],
        ["block events absorbed / s (one coordinator core)", r["block_events_per_s"]],
        ["batches / s", r["batches_per_s"]],
        ["time to absorb everything (s)", r["absorb_s"]],
        ["indexed (block, engine) entries", r["index_entries"]],
        ["distinct blocks", r["index_distinct_blocks"]],
        ["coordinator RSS before → after (MB)", f"{r['rss_before_mb']} → {r['rss_after_mb']}"],
        ["bytes per (block, engine) entry", r["bytes_per_entry"]],
    ]
    return "### KV-event ingest\n\n" + report.table(["measure", "value"], rows)


__all__ = ["add_args", "run"]
