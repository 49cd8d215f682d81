"""Coordinator scaling: requests/s through 1, 2 and 4 coordinator processes on one port.

One run, the same simulated engines' settings for every count: ``fleet up --engine sim
--coordinators N`` (N coordinator processes sharing one listening socket, one leading
placement), then ``wrk`` (C, closed loop, ``--connections``) for ``--wrk-seconds`` against
``/v1/completions``. Fast simulators (the coordinators, not the engines, bound the rate), and
"direct" (wrk against one engine, times the engine count) shows the engines' own ceiling.
Scaling efficiency = req/s with N / (N × req/s with 1). On a machine with fewer cores than
coordinators plus wrk, the cores bound it: the result records the core count.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from . import report, targets
from .proxy_overhead import FAST_SIM, _parse_wrk


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--counts", default="1,2,4", help="coordinator counts (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--connections", type=int, default=64, help="wrk connections")
    p.add_argument("--wrk-seconds", type=int, default=10)


def run(args: argparse.Namespace, out: Path | None = None) -> dict[str, Any]:
    """Run the benchmark and write its results."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("coordinators needs wrk (apt-get install wrk)")
    counts = [int(c) for c in args.counts.split(",")]
    log_dir = Path(tempfile.mkdtemp(prefix="bench-coordinators-"))
    script = log_dir / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f'wrk.body = \'{{"model": "{targets.MODEL_NAME}", "prompt": "Hello", '
        f'"max_tokens": {args.max_tokens}, "temperature": 0}}\'\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    result: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k not in ("run", "out")},
        "cores": os.cpu_count(),
        "runs": {},
    }
    for n in counts:
        extra = ("--coordinators", str(n)) if n > 1 else ()
        with targets.fleet_up(args.engines, log_dir / f"n{n}", FAST_SIM, extra) as (url, engines):
            if "direct" not in result:
                one = _wrk(wrk, script, engines[0], args)
                result["direct"] = one | {"engines": len(engines)}
            result["runs"][str(n)] = _wrk(wrk, script, url, args)
    base = result["runs"].get("1", {}).get("requests_per_s") or 0.0
    for n, r in result["runs"].items():
        r["efficiency"] = round(r["requests_per_s"] / (int(n) * base), 3) if base else None
    result["logs"] = str(log_dir)
    md = _markdown(result)
    folder = report.write("coordinators", result, md, out=out)
    print(md)
    print(f"\nwritten to {folder}")
    return result


def _wrk(wrk: str, script: Path, base: str, args: argparse.Namespace) -> dict[str, Any]:
    argv = [wrk, "-t2", f"-c{args.connections}", f"-d{args.wrk_seconds}s", "--latency",
            "-s", str(script), base + "/v1/completions"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    return _parse_wrk(proc.stdout)


def _markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    direct = result["direct"]
    rows = [
        [f"{n} coordinator{'s' if n != '1' else ''}", r["requests_per_s"], r["efficiency"],
         r["latency_p50"], r["latency_p99"], r["non_2xx"]]
        for n, r in result["runs"].items()
    ]  # fmt: skip
    ceiling = round(direct["requests_per_s"] * direct["engines"], 1)
    rows.append([f"direct (1 engine × {direct['engines']})", ceiling, "-",
                 direct["latency_p50"], direct["latency_p99"], direct["non_2xx"]])  # fmt: skip
    md = (
        f"### Coordinator scaling ({cfg['engines']} simulated engines, wrk "
        f"{cfg['connections']} connections × {cfg['wrk_seconds']} s, {result['cores']} cores)\n\n"
    )
    return md + report.table(["target", "req/s", "efficiency", "p50", "p99", "non-2xx"], rows)


__all__ = ["add_args", "run"]
