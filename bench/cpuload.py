"""Closed-loop load for CPU-cost benchmarks, and the CPU time of a process tree.

The load runs in its own process, so the router measured shares nothing with it but the
machine. Either generator keeps ``connections`` kept-alive connections busy for ``seconds`` and
checks every answer (status 200 and, for a stream, at least ``min_events`` SSE ``data:`` lines
and ``[DONE]``; for a plain answer, its ``choices``):

- ``python`` (the default): :func:`client_main`, an h11 client on trio sockets (``python -c``).
  It stops sending at the deadline and lets the requests in flight finish, so every request
  sent is one the router did all the work of: ``sent == ok + bad``.
- ``wrk`` (C, with a Lua script), where installed: lighter, but it stops at its deadline with
  ``connections`` requests cut in flight, which a saturated router has mostly not started; at
  256 streams that is a large share of a short run. Its figures count answered requests
  (``ok + bad``), so the cut ones' partial work makes them an upper bound.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import h11
import trio

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid``, all its threads, and its live descendants
    (``/proc/PID/stat``; children that exited and were waited for add their time too)."""
    total = 0.0
    for one in [pid, *_descendants(pid)]:
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
        total += utime + stime + cutime + cstime
    return total / _CLK_TCK


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@dataclass(frozen=True)
class Load:
    """What one load run did: requests sent, answered right, answered wrong (or not at all)."""

    generator: str
    sent: int
    ok: int
    bad: int
    wall_s: float


def run_load(
    url: str,
    body: bytes,
    *,
    stream: bool,
    min_events: int,
    connections: int,
    seconds: float,
    generator: str = "python",
) -> Load:
    """Keep ``connections`` requests of ``body`` to ``url`` in flight for ``seconds``.

    Args:
        generator: ``python`` or ``wrk`` (see the module's docstring).

    Returns:
        What was sent and answered; ``sent`` is ``ok + bad`` for wrk (answered requests).

    Raises:
        ValueError: an unknown ``generator``, or ``wrk`` asked for and not installed.
        RuntimeError: the generator failed.
    """
    wrk = shutil.which("wrk")
    if generator not in ("wrk", "python"):
        raise ValueError(f"generator: {generator!r} is not wrk or python")
    if generator == "wrk" and wrk is None:
        raise ValueError("generator: wrk is not installed (apt-get install wrk)")
    mark = "[DONE]" if stream else '"choices"'
    events = min_events if stream else 0
    started = time.monotonic()
    if wrk is not None and generator == "wrk":
        _, ok, bad = _wrk(wrk, url, body, mark, events, connections, seconds)
        sent, name = ok + bad, "wrk"
    else:
        argv = [sys.executable, "-c", "from fleet.bench.cpuload import client_main; client_main()"]
        argv += [url, body.decode(), mark, str(events), str(connections), str(seconds)]
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"load client failed: {proc.stderr[-2000:]}")
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        sent, ok, bad, name = got["sent"], got["ok"], got["bad"], "python"
    return Load(name, sent, ok, bad, round(time.monotonic() - started, 3))


_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = %s
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) sent = 0; ok = 0; bad = 0 end
function request() sent = sent + 1; return wrk.format() end
function response(status, headers, body)
  local _, events = string.gsub(body, "data: ", "")
  if status == 200 and string.find(body, %s, 1, true) and events >= %d then
    ok = ok + 1 else bad = bad + 1 end
end
function done(summary, latency, requests)
  local s, o, b = 0, 0, 0
  for _, t in ipairs(threads) do
    s = s + t:get("sent"); o = o + t:get("ok"); b = b + t:get("bad")
  end
  io.write(string.format("LOAD sent=%%d ok=%%d bad=%%d\\n", s, o, b))
end
"""


def _lua_string(text: str) -> str:
    return "[==[" + text + "]==]"


def _wrk(
    wrk: str, url: str, body: bytes, mark: str, events: int, connections: int, seconds: float
) -> tuple[int, int, int]:
    script = Path(tempfile.mkdtemp(prefix="bench-load-")) / "post.lua"
    script.write_text(_LUA % (_lua_string(body.decode()), _lua_string(mark), events))
    threads = max(1, min(2, connections))
    argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s"]
    argv += ["--timeout", "30s", "-s", str(script), url]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    found = re.search(r"LOAD sent=(\d+) ok=(\d+) bad=(\d+)", proc.stdout)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout}{proc.stderr}"[-2000:])
    sent, ok, bad = (int(g) for g in found.groups())
    return sent, ok, bad


def client_main() -> None:
    """``python -c``: URL BODY MARK MIN_EVENTS CONNECTIONS SECONDS; prints a JSON line."""
    url, body, mark, events, connections, seconds = sys.argv[1:7]
    counts = trio.run(
        _client, url, body.encode(), mark.encode(), int(events), int(connections), float(seconds)
    )
    print(json.dumps(counts))


async def _client(
    url: str, body: bytes, mark: bytes, events: int, connections: int, seconds: float
) -> dict[str, int]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = h11.Request(
        method="POST",
        target=parts.path or "/",
        headers=[("host", f"{host}:{port}"), ("content-type", "application/json"),
                 ("content-length", str(len(body)))],
    )  # fmt: skip
    counts = {"sent": 0, "ok": 0, "bad": 0}
    deadline = trio.current_time() + seconds

    async def worker() -> None:
        stream: trio.SocketStream | None = None
        conn = h11.Connection(h11.CLIENT)
        while trio.current_time() < deadline:
            if stream is None:
                stream = await trio.open_tcp_stream(host, port)
                conn = h11.Connection(h11.CLIENT)
            counts["sent"] += 1
            try:
                status, answer = await _exchange(stream, conn, head, body)
            except (trio.BrokenResourceError, h11.ProtocolError):
                counts["bad"] += 1
                await stream.aclose()
                stream = None
                continue
            good = status == 200 and mark in answer and answer.count(b"data: ") >= events
            counts["ok" if good else "bad"] += 1
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
            else:
                await stream.aclose()
                stream = None
        if stream is not None:
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(worker)
    return counts


async def _exchange(
    stream: trio.SocketStream, conn: h11.Connection, head: h11.Request, body: bytes
) -> tuple[int, bytes]:
    out = b"".join(conn.send(e) or b"" for e in (head, h11.Data(data=body), h11.EndOfMessage()))
    await stream.send_all(out)
    status, answer = 0, bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(data)  # b"": the server closed (an h11 error if mid-answer)
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            answer += event.data
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return status, bytes(answer)


__all__ = ["Load", "client_main", "cpu_s", "run_load"]
