"""``fleet chaos list`` and ``fleet chaos run [SCENARIO ...]`` (the parser is in fleet/cli.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import httpx
import trio

from fleet.protocol.errors import ConfigError

from . import report
from .cacheredis import cache_backend
from .coordinators import find_coordinators
from .errors import ChaosError
from .scenarios import ChaosConfig, Figures, run, scenarios
from .target import connect


def config(settings: list[str]) -> ChaosConfig:
    """A :class:`ChaosConfig` with ``KEY=VALUE`` overrides.

    Raises:
        ConfigError: an unknown key or a value of the wrong type.
    """
    fields = {f.name: f for f in dataclasses.fields(ChaosConfig)}
    values: dict[str, Any] = {}
    for item in settings:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise ConfigError("--set", item, f"needs KEY=VALUE with KEY one of {sorted(fields)}")
        kind = str(fields[key].type)
        try:
            if kind == "bool":
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                values[key] = text.lower() in ("true", "1")
            elif kind == "int":
                values[key] = int(text)
            else:
                values[key] = float(text)
        except ValueError as exc:
            raise ConfigError("--set", item, f"{key} takes a {kind}") from exc
    return ChaosConfig(**values)


def list_command(args: argparse.Namespace) -> int:
    """Print the scenarios."""
    for scenario in scenarios().values():
        print(f"{scenario.name:16} {scenario.summary}")
    return 0


def run_command(args: argparse.Namespace) -> int:
    """Run the scenarios asked for (all by default) against ``--coordinator``; write results.

    Returns:
        0 when every target was met, 1 otherwise.

    Raises:
        ChaosError: an unknown scenario, or a fleet that cannot be driven.
        ConfigError: a bad ``--set``.
    """
    known = scenarios()
    names = args.scenarios or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ChaosError(f"unknown scenario(s) {unknown}; known: {', '.join(known)}")
    cfg = config(args.set)

    async def main() -> list[Figures]:
        out = []
        async with httpx.AsyncClient() as http:
            target = await connect(args.coordinator, http, args.model, api_key=args.api_key)
            live = sum(not n["lost"] for n in (await target.get("/api/v1/nodes"))["nodes"])
            coordinators = 1
            if not args.scenarios and any(known[n].coordinators > 1 for n in names):
                coordinators = len(await find_coordinators(target.url))
            for name in names:
                if not args.scenarios and known[name].nodes > live:
                    print(f"• {name} skipped: needs {known[name].nodes} nodes, the fleet has "
                          f"{live}", file=sys.stderr, flush=True)  # fmt: skip
                    continue
                if not args.scenarios and known[name].coordinators > coordinators:
                    print(f"• {name} skipped: needs {known[name].coordinators} coordinators, "
                          f"the fleet has {coordinators}", file=sys.stderr, flush=True)  # fmt: skip
                    continue
                cache = cache_backend(await target.metrics())[0] if known[name].cache else ""
                if not args.scenarios and known[name].cache not in ("", cache):
                    print(f"• {name} skipped: needs a {known[name].cache} response cache, the "
                          f"fleet has {cache or 'none'}", file=sys.stderr, flush=True)  # fmt: skip
                    continue
                link = "curve" if target.agent_curve_key else "plaintext"
                if not args.scenarios and known[name].link not in ("", link):
                    print(f"• {name} skipped: needs a {known[name].link} agent link, the "
                          f"fleet's is {link}", file=sys.stderr, flush=True)  # fmt: skip
                    continue
                if args.output == "table":
                    print(f"• {name} ...", file=sys.stderr, flush=True)
                out.append(await run(name, target, cfg))
        return out

    results = trio.run(main)
    folder = report.write(results, Path(args.out) if args.out else None)
    if args.output == "json":
        print(json.dumps({"results": results, "out": str(folder)}, indent=2))
    else:
        print(report.markdown(results))
        print(f"\nresults in {folder}/")
    return 0 if all(not f["missed"] for f in results) else 1


__all__ = ["config", "list_command", "run_command"]
