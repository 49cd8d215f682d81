"""How fast this machine runs Python now, warm and cold, for reading one run beside another.

Why: the same proxy code measured 0.31 ms of CPU per plain request one night and 0.53 ms the
next day on "the same" machine (a shared virtual machine whose neighbours come and go), and a
light-load request finds every core cold: after a few milliseconds idle, work that takes 4 us
back to back takes 70-80 us. A run's figures mean little without the machine's state beside
them, so ``proxy-overhead`` and ``proxy-cpu`` record this probe at their start and end.

The probe: a fixed piece of a proxy's work (decoding a completion request's JSON body and
encoding it again), timed in this thread's CPU time back to back (``warm_us``: the machine's
speed) and each after ``idle_s`` asleep (``cold_us``: what a request at light load finds);
medians.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

BODY = json.dumps(
    {"model": "demo", "prompt": "Hello from the benchmark", "max_tokens": 16, "temperature": 0}
)


def _work() -> None:
    json.dumps(json.loads(BODY))


def probe(samples: int = 200, idle_s: float = 0.005) -> dict[str, Any]:
    """The machine's warm and cold cost of the reference work (module docstring): about
    ``samples * idle_s`` seconds."""
    for _ in range(200):
        _work()
    warm: list[float] = []
    for _ in range(samples):
        started = time.thread_time()
        for _ in range(10):
            _work()
        warm.append((time.thread_time() - started) / 10)
    cold: list[float] = []
    for _ in range(samples):
        time.sleep(idle_s)
        started = time.thread_time()
        _work()
        cold.append(time.thread_time() - started)
    warm_us, cold_us = statistics.median(warm) * 1e6, statistics.median(cold) * 1e6
    return {
        "warm_us": round(warm_us, 2),
        "cold_us": round(cold_us, 2),
        "cold_factor": round(cold_us / warm_us, 1) if warm_us > 0 else None,
        "idle_s": idle_s,
    }


def line(start: dict[str, Any], end: dict[str, Any]) -> str:
    """One markdown line with the probes taken at a run's start and end."""

    def one(p: dict[str, Any]) -> str:
        idle_ms = p["idle_s"] * 1000
        return (
            f"{p['warm_us']:.1f} us warm, {p['cold_us']:.1f} us after {idle_ms:g} ms idle "
            f"({p['cold_factor']}x)"
        )

    return (
        f"*Machine probe* (`bench/machineprobe.py`: a request body's JSON decoded and encoded, "
        f"CPU time): {one(start)} at the start; {one(end)} at the end.\n"
    )


__all__ = ["line", "probe"]
