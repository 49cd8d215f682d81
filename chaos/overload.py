"""``overload``: a burst at ``burst_factor`` × the fleet's measured capacity.

Capacity first: ``capacity_concurrency`` closed-loop clients, each on its own kept-alive
connection, for ``capacity_s``: their successes per second. Then the burst:
``burst_factor × capacity_rps`` requests per second for ``burst_s``, each from a new connection
(clients arriving, not a pool), the same non-streaming requests. Both use the bare client of
:mod:`.rawhttp`, cheap enough that the load generator, which shares the machine's CPU with the
fleet, can offer the rate; ``offered_rps`` says what it really offered.

Every rejection must be a 503 with ``Retry-After`` (admission control sheds what its queues cannot
hold), and the fleet must keep serving meanwhile: ``goodput_rps`` is the burst's successes per
second from its first request to its last success. Capacity is measured again after the burst
the same way; ``capacity_rps`` is the mean of the two (``capacity_before_rps``,
``capacity_after_rps``) and ``goodput_ratio`` = goodput / capacity.
``listen_overflows`` is this machine's kernel count of connections a full listen queue refused
during the burst (``/proc/net/netstat``; None where unreadable).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from pathlib import Path

import trio

from .load import LoadSpec, plan, run_clock
from .outcomes import Outcome, Record, figures
from .rawhttp import Reader, address, exchange, json_request, record, send_on
from .scenarios import ChaosConfig, Figures, load_spec
from .target import Target, deltas

CONNECT_AT_ONCE = 32  # connections being opened at once before a burst (the listen queue is small)
COUNTERS = ("fleet_requests_shed_total", "fleet_retries_total", "fleet_upstream_errors_total")


async def overload(target: Target, cfg: ChaosConfig) -> Figures:
    """Measure capacity, then burst (see the module docstring)."""
    spec = load_spec(
        target, cfg, "overload", stream_share=0.0, deadline_s=max(cfg.deadline_s, 10.0)
    )
    clock = run_clock()
    probe = await _closed_loop(target, spec, cfg, clock, until=cfg.capacity_s, first=0)
    window = [r for r in probe if r.end_s <= cfg.capacity_s]
    capacity_before = sum(r.outcome is Outcome.SUCCEEDED for r in window) / cfg.capacity_s
    rate = max(cfg.burst_factor * capacity_before, 1.0)
    count = max(1, math.ceil(rate * cfg.burst_s))
    before, overflows = await target.metrics(), _listen_overflows()
    burst, t0 = await _burst(target, spec, cfg, clock, rate, count, first=len(probe))
    after, overflows_after = await target.metrics(), _listen_overflows()
    # Capacity again once the burst is over: the ratio is against the mean of the two, so a
    # machine (2 shared cores) busier or idler during one measurement moves it less.
    t1 = clock()
    again = await _closed_loop(
        target, spec, cfg, clock, until=t1 + cfg.capacity_s, first=len(probe) + len(burst)
    )
    ok_after = sum(r.outcome is Outcome.SUCCEEDED for r in again if r.end_s <= t1 + cfg.capacity_s)
    capacity_after = ok_after / cfg.capacity_s
    capacity_rps = (capacity_before + capacity_after) / 2
    good = [r for r in burst if r.outcome is Outcome.SUCCEEDED]
    sent_span = max(r.start_s for r in burst) - t0
    span = max(r.end_s for r in good) - t0 if good else 0.0
    goodput = len(good) / span if span > 0 else 0.0
    return {
        **figures(burst),
        "detect_s": None,
        "recover_s": None,
        "capacity_rps": round(capacity_rps, 1),
        "capacity_before_rps": round(capacity_before, 1),
        "capacity_after_rps": round(capacity_after, 1),
        "capacity_p50_ms": figures(window)["p50_ms"],
        "burst_rps": round(rate, 1),
        "offered_rps": round(count / sent_span, 1) if sent_span > 0 else None,
        "goodput_rps": round(goodput, 1),
        "goodput_ratio": round(goodput / capacity_rps, 3) if capacity_rps else None,
        "listen_overflows": None
        if overflows is None or overflows_after is None
        else overflows_after - overflows,
        "coordinator": deltas(before, after, COUNTERS),
    }


async def _closed_loop(
    target: Target,
    spec: LoadSpec,
    cfg: ChaosConfig,
    clock: Callable[[], float],
    *,
    until: float,
    first: int,
) -> list[Record]:
    host, port = address(target.url)
    records: list[Record] = []
    counter = [first]

    async def client() -> None:
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            reader = Reader(stream)
            while clock() < until:
                index = counter[0]
                counter[0] += 1
                req = plan(spec, index)
                start = clock()
                await stream.send_all(json_request(req.path, host, req.body, req.headers, False))
                with trio.move_on_after(cfg.client_timeout_s):
                    answer = await reader.answer()
                records.append(record(req.kind, start, answer, clock))
                if not reader.next_cycle():
                    return

    async with trio.open_nursery() as nursery:
        for _ in range(cfg.capacity_concurrency):
            nursery.start_soon(client)
    return records


async def _burst(
    target: Target,
    spec: LoadSpec,
    cfg: ChaosConfig,
    clock: Callable[[], float],
    rate: float,
    count: int,
    *,
    first: int,
) -> tuple[list[Record], float]:
    """``count`` requests at ``rate``, one per connection; the connections are opened before
    the burst (``cfg.burst_new_connections``: each as its request leaves).

    Returns:
        The records, and when the first request left (on ``clock``).
    """
    host, port = address(target.url)
    records: list[Record] = []
    streams: list[trio.SocketStream | None] = [None] * count
    if not cfg.burst_new_connections:
        limiter = trio.CapacityLimiter(CONNECT_AT_ONCE)

        async def connect(i: int) -> None:
            async with limiter:
                with contextlib.suppress(OSError):
                    streams[i] = await trio.open_tcp_stream(host, port)

        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(connect, i)

    async def one(i: int) -> None:
        req = plan(spec, first + i)
        start = clock()
        data = json_request(req.path, host, req.body, req.headers)
        stream = streams[i]
        if stream is None:
            answer = await exchange(host, port, data, cfg.client_timeout_s)
        else:
            answer = await send_on(stream, data, cfg.client_timeout_s)
        records.append(record(req.kind, start, answer, clock))

    started, t0 = clock(), trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(count):
            await trio.sleep_until(t0 + i / rate)
            nursery.start_soon(one, i)
    return records, started


def _listen_overflows() -> int | None:
    """``TcpExt: ListenOverflows`` of this machine, or None where it cannot be read."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            value = table.get("ListenOverflows")
            return int(value) if value is not None else None
    return None


__all__ = ["overload"]
