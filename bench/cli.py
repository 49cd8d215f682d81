"""Command line of the benchmarks: ``python -m bench NAME [options]`` or ``fleet bench NAME``."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from pathlib import Path

BENCHMARKS = {
    "proxy-overhead": "proxy_overhead",
    "kv-ingest": "kv_ingest",
    "routing-quality": "routing_quality",
    "pick-overhead": "pick_overhead",
    "coordinators": "coordinators",
    "engine-client": "engine_client",
    "simday": "simday",
    "pd-split": "pd_split",
    "proxy-cpu": "proxy_cpu",
    "tokenize-stall": "tokenize_stall",
}


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments and run the chosen benchmark."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="name", required=True, metavar="NAME")
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(f"{__package__}.{module_name}")
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        module.add_args(p)
        p.add_argument("--out", type=Path, default=None, help="results folder (bench/results)")
        p.set_defaults(run=module.run)
    args = parser.parse_args(argv)
    args.run(args, out=args.out)


__all__ = ["BENCHMARKS", "main"]
