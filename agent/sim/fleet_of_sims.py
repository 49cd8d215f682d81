"""Start many simulated engines on this machine, measure them, stop them.

``python -m fleet.agent.sim.fleet_of_sims --model DIR --count 64`` starts ``count`` simulators
(each ``python -m fleet.agent.sim`` with the agent's vLLM flags, its own free port, all
publishing KV events to one SUB socket this tool binds, topic ``kv@sim-<i>@<model>``), waits
until every one has printed its serving line and answered ``GET /health`` 200, sends each one
completion whose prompt fills a KV block, waits for one KV batch from each topic, then reports
the time to all-healthy and the memory of the simulators (RSS and PSS summed over their
processes) and stops them all (SIGTERM, then SIGKILL after ``--grace-s``).

It waits on events only: each child's first output line, HTTP answers, ZMQ messages.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio
import zmq

from fleet.protocol.vllm_events import decode_vllm_message
from fleet.protocol.zmqio import open_socket, recv_batch

PROMPT = "Fleet routes every request to the engine that holds the longest prefix. " * 3


@dataclass
class Child:
    """One simulator process."""

    index: int
    proc: trio.Process
    url: str = ""


def _read_kb(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0


def memory_kb(pids: Sequence[int]) -> tuple[int, int]:
    """Sum of RSS and of PSS (``/proc/<pid>/smaps_rollup``) over ``pids``, in kB."""
    rss = sum(_read_kb(Path(f"/proc/{pid}/status"), "VmRSS") for pid in pids)
    pss = sum(_read_kb(Path(f"/proc/{pid}/smaps_rollup"), "Pss") for pid in pids)
    return rss, pss


def sim_argv(model: Path, index: int, kv_endpoint: str, extra: Sequence[str]) -> list[str]:
    """The argv of simulator ``index``: the agent's vLLM flags, port 0, its own KV topic."""
    kv = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": kv_endpoint,
        "topic": f"kv@sim-{index}@demo",
    }
    return [
        sys.executable, "-m", "fleet.agent.sim",
        "--model", str(model), "--served-model-name", "demo",
        "--host", "127.0.0.1", "--port", "0",
        "--max-model-len", "1024", "--block-size", "32", "--enable-prefix-caching",
        "--kv-events-config", json.dumps(kv),
        "--dtype", "float32", "--enforce-eager",
        *extra,
    ]  # fmt: skip


async def _serving_url(child: Child) -> None:
    stream = child.proc.stdout
    assert stream is not None
    line = b""
    while not line.endswith(b"\n"):
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise RuntimeError(f"sim {child.index} exited before serving: {line!r}")
        line += chunk
    first = line.split(b"\n", 1)[0].decode()
    if " at " not in first:
        raise RuntimeError(f"sim {child.index}: unexpected first line {first!r}")
    child.url = first.rsplit(" at ", 1)[1].strip()


async def run(model: Path, count: int, grace_s: float, extra: Sequence[str]) -> dict[str, float]:
    """Start ``count`` simulators, measure, stop them; return the measurements."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    children: list[Child] = []
    results: dict[str, float] = {"count": count}
    try:
        with open_socket(ctx, zmq.SUB) as sub:
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            port = sub.bind_to_random_port("tcp://127.0.0.1")
            endpoint = f"tcp://127.0.0.1:{port}"
            started = time.monotonic()
            for i in range(count):
                argv = sim_argv(model, i, endpoint, extra)
                proc = await trio.lowlevel.open_process(argv, stdout=-1, stderr=-3)
                children.append(Child(i, proc))
            results["spawn_s"] = time.monotonic() - started
            async with httpx.AsyncClient(timeout=60) as http:

                async def healthy(child: Child) -> None:
                    await _serving_url(child)
                    response = await http.get(child.url + "/health")
                    response.raise_for_status()

                async with trio.open_nursery() as nursery:
                    for child in children:
                        nursery.start_soon(healthy, child)
                results["all_healthy_s"] = time.monotonic() - started
                sub.getsockopt(zmq.EVENTS)  # send the subscription on every new pipe
                rss, pss = memory_kb([c.proc.pid for c in children])
                results["rss_idle_mb"] = rss / 1024
                results["pss_idle_mb"] = pss / 1024

                async def complete(child: Child) -> None:
                    body = {"model": "demo", "prompt": PROMPT, "max_tokens": 4}
                    response = await http.post(child.url + "/v1/completions", json=body)
                    response.raise_for_status()

                t0 = time.monotonic()
                topics: set[str] = set()
                async with trio.open_nursery() as nursery:
                    for child in children:
                        nursery.start_soon(complete, child)
                    with trio.move_on_after(30):
                        while len(topics) < count:
                            for frames in await recv_batch(sub):
                                topics.add(decode_vllm_message(frames).topic)
                results["requests_s"] = time.monotonic() - t0
                results["kv_topics_seen"] = len(topics)
                rss, pss = memory_kb([c.proc.pid for c in children])
                results["rss_after_mb"] = rss / 1024
                results["pss_after_mb"] = pss / 1024
    finally:
        with trio.CancelScope(shield=True):
            for child in children:
                if child.proc.returncode is None:
                    child.proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(grace_s):
                for child in children:
                    await child.proc.wait()
            for child in children:
                if child.proc.returncode is None:
                    child.proc.kill()
                await child.proc.wait()
            ctx.term()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, run, print the measurements as JSON."""
    parser = argparse.ArgumentParser(prog="python -m fleet.agent.sim.fleet_of_sims")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--grace-s", type=float, default=10.0)
    parser.add_argument("sim_args", nargs="*", help="extra simulator flags (after --)")
    args = parser.parse_args(argv)
    results = trio.run(run, args.model, args.count, args.grace_s, args.sim_args)
    print(json.dumps({k: round(v, 2) for k, v in results.items()}, indent=2))
    return 0 if results.get("kv_topics_seen") == args.count else 1


if __name__ == "__main__":
    raise SystemExit(main())

__all__ = ["main", "memory_kb", "run", "sim_argv"]
