"""Engine client CPU: httpx (as the coordinator used it) against Fleet's h11 engine client.

The client side of the coordinator's request path alone: ``--requests`` plain POSTs, read to
the end, at ``--concurrency`` in flight, against a minimal h11 engine stand-in in its own process
(a fixed small JSON answer, kept alive), so the CPU time of this process is the client's. Each
client runs ``--rounds`` times, interleaved, after a warm-up; reported: requests/s and client CPU
ms per request (``time.process_time``), and the connections each opened.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import h11
import httpx
import trio

from fleet.coordinator.engineclient import EngineClient

from . import report, targets

ANSWER = b'{"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":"hello"}]}'
BODY = b'{"model": "demo", "prompt": "Hello", "max_tokens": 16}'
HEADERS = {"content-type": "application/json", "x-request-id": "bench"}
WARMUP = 200


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=3000, help="per client and round")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)


def run(args: argparse.Namespace, out: Path | None = None) -> dict[str, Any]:
    """Start the stand-in engine, time both clients, write the results."""
    log_dir = Path(tempfile.mkdtemp(prefix="bench-engine-client-"))
    port = targets.free_port()
    code = "import sys; from fleet.bench.engine_client import serve; serve(int(sys.argv[1]))"
    proc = targets.start("h11-engine", [sys.executable, "-c", code, str(port)], log_dir)
    url = f"http://127.0.0.1:{port}"
    rows: list[dict[str, Any]] = []
    try:
        targets.wait_http(url, proc, timeout_s=30)
        for i in range(args.rounds):
            for name in ("httpx", "h11"):
                got = trio.run(_measure, name, url, args.requests, args.concurrency)
                rows.append({"client": name, "round": i + 1, **got})
                print(rows[-1])
    finally:
        proc.stop()
    cfg = {k: v for k, v in vars(args).items() if k not in ("run", "out")}
    result = {"config": cfg, "runs": rows}
    md = (
        f"### Engine client ({args.requests} plain requests per run, {args.concurrency} in "
        "flight, one stand-in engine)\n\n"
    )
    md += report.table(
        ["client", "round", "req/s", "client CPU ms/req", "connections opened"],
        [
            [r["client"], r["round"], r["requests_per_s"], r["cpu_ms_per_request"], r["opened"]]
            for r in rows
        ],
    )
    folder = report.write("engine_client", result, md, out=out)
    print(md)
    print(f"\nwritten to {folder}")
    return result


async def _measure(name: str, url: str, n: int, concurrency: int) -> dict[str, Any]:
    if name == "httpx":
        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=128)
        async with httpx.AsyncClient(timeout=httpx.Timeout(10.0), limits=limits) as client:

            async def one_httpx() -> None:
                request = client.build_request(
                    "POST", url + "/v1/completions", content=BODY, headers=HEADERS
                )
                response = await client.send(request, stream=True)
                async for _ in response.aiter_raw():
                    pass
                await response.aclose()

            return await _timed(one_httpx, n, concurrency) | {"opened": "-"}
    engine = EngineClient(url, max_connections=1024, max_idle=128)

    async def one_h11() -> None:
        response = await engine.request("POST", "/v1/completions", HEADERS, BODY)
        async for _ in response.aiter_raw():
            pass

    got = await _timed(one_h11, n, concurrency)
    await engine.aclose()
    return got | {"opened": engine.connections_opened}


async def _timed(one: Callable[[], Awaitable[None]], n: int, concurrency: int) -> dict[str, Any]:
    for _ in range(WARMUP):
        await one()
    wall, cpu = time.perf_counter(), time.process_time()

    async def worker(count: int) -> None:
        for _ in range(count):
            await one()

    per = n // concurrency
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker, per)
    done = per * concurrency
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "requests_per_s": round(done / wall),
        "cpu_ms_per_request": round(cpu * 1000 / done, 3),
    }


def serve(port: int) -> None:
    """The stand-in engine: answers every request with :data:`ANSWER`, keeping connections."""

    async def connection(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return
                if not data:
                    return
                conn.receive_data(data)
            elif type(event) is h11.EndOfMessage:
                head = h11.Response(
                    status_code=200,
                    headers=[
                        ("content-type", "application/json"),
                        ("content-length", str(len(ANSWER))),
                    ],
                )
                out = b"".join(
                    conn.send(e) or b"" for e in (head, h11.Data(data=ANSWER), h11.EndOfMessage())
                )
                await stream.send_all(out)
                conn.start_next_cycle()

    trio.run(partial(trio.serve_tcp, connection, port, host="127.0.0.1"))


__all__ = ["add_args", "run", "serve"]
