"""The ``fleet`` command: entry point of every process and the CLI to inspect a running fleet.

::

    fleet up                 coordinator + one local agent in one process tree (single machine)
    fleet coordinator        the coordinator alone
    fleet agent              a node agent alone; `fleet agent inspect` asks one directly
    fleet engines            the fleet's engines
    fleet nodes              its nodes; `fleet node inspect NODE`: GPUs, cache, heartbeat
    fleet deployments        declared deployments: desired, ready, and why not
    fleet deploy -f FILE     create or replace deployments (--wait: until ready)
    fleet models             model caches and downloads; `fleet models prestage NAME`
    fleet kv stats           the KV index: size, blocks and events per engine, gaps, replays
    fleet route explain      each engine's filters and scores for a prompt
    fleet gpus               this machine's GPUs as NVML sees them
    fleet config             contexts: where the CLI connects
    fleet keys               CURVE keys for the agent link (docs/SECURITY.md)
    fleet demo-model         build the tiny offline demo model
    fleet chaos              the failure-recovery suite against a running fleet (chaos/README.md)

The inspection commands print -o table|wide|json|yaml and take --watch. Where they connect:
--coordinator, else $FLEET_COORDINATOR, else the current context (`fleet config`), else
http://127.0.0.1:8080. Exit status: 0 done, 1 the fleet could not be asked or has no such
thing, 2 a usage error (a bad flag or setting).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fleet.cliconn import add_coordinator_args, resolve
from fleet.cliserve import shared_flags
from fleet.protocol.errors import ConfigError, FleetError

EXIT_ERROR = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ``fleet`` command; exits with 0, 1 (an error from the fleet, or not found) or
    2 (usage), printing an error as one line on stderr."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmarks parse their own options, --help included
        from fleet.bench.cli import main as bench_main

        bench_main(argv[1:])
        return
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "resolve_target", False):
            resolve(args)
        code = args.func(args)
    except ConfigError as exc:
        print(f"fleet: error: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except FleetError as exc:
        print(f"fleet: error: {exc}", file=sys.stderr)
        code = EXIT_ERROR
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # `fleet engines | head`: the reader left
        sys.stderr.close()
        code = 0
    sys.exit(code)


def _parser() -> argparse.ArgumentParser:
    from fleet import cliagent, cliconfig, cliinspect, clikv, deploycli, modelscli
    from fleet.cliserveargs import add_serve_parsers, fake_gpus_arg
    from fleet.keyscli import add_parser as add_keys_parser

    parser = argparse.ArgumentParser(
        prog="fleet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"fleet {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    agent = add_serve_parsers(sub)
    cliagent.add_parser(agent)
    add_keys_parser(sub)
    cliinspect.add_parsers(sub, fake_gpus_arg)
    deploycli.add_parsers(sub)
    modelscli.add_parser(sub)
    clikv.add_parsers(sub)
    cliconfig.add_parser(sub)

    chaos = sub.add_parser("chaos", help="the failure-recovery suite (chaos/README.md)")
    chaos_sub = chaos.add_subparsers(dest="chaos_cmd", required=True, metavar="COMMAND")
    chaos_list = chaos_sub.add_parser("list", help="the scenarios")
    chaos_list.set_defaults(func=_cmd_chaos)
    chaos_run = chaos_sub.add_parser("run", help="run scenarios against a running fleet")
    chaos_run.add_argument("scenarios", nargs="*", metavar="SCENARIO", help="default: all")
    add_coordinator_args(chaos_run, admin=False)
    chaos_run.add_argument("--model", default=None, help="default: the first served model")
    chaos_run.add_argument(
        "--api-key",
        default=os.environ.get("FLEET_API_KEY", ""),
        help="for a fleet started with --api-keys (default $FLEET_API_KEY)",
    )
    chaos_run.add_argument(
        "--out", default=None, metavar="DIR", help="results folder (default chaos/results)"
    )
    chaos_run.add_argument("-o", "--output", choices=("table", "json"), default="table")
    chaos_run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a scenario setting, e.g. burst_new_connections=true (repeatable; see ChaosConfig)",
    )
    chaos_run.set_defaults(func=_cmd_chaos)

    bench = sub.add_parser("bench", help="run a benchmark (see bench/README.md)", add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_cmd_bench)

    demo = sub.add_parser("demo-model", help="build the tiny random-weight demo model offline")
    demo.add_argument("path", type=Path)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo_model)
    return parser


def parser_of(command: str) -> argparse.ArgumentParser:
    """The sub-parser of ``command``."""
    for action in _parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]  # type: ignore[no-any-return]
    raise KeyError(command)


_parser_of = parser_of
_shared_flags = shared_flags


def _version() -> str:
    from fleet import __version__

    return __version__


def _cmd_chaos(args: argparse.Namespace) -> int:
    from fleet.chaos.cli import list_command, run_command

    return list_command(args) if args.chaos_cmd == "list" else run_command(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from fleet.bench.cli import main as bench_main

    bench_main(args.bench_args)
    return 0


def _cmd_demo_model(args: argparse.Namespace) -> int:
    from fleet.demomodel import build_demo_model

    path = build_demo_model(args.path, seed=args.seed)
    print(path)
    return 0


__all__ = ["EXIT_ERROR", "EXIT_USAGE", "FleetError", "main", "parser_of"]
