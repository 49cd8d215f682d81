"""The ``fleet`` command: entry point of every process and the CLI to inspect a running fleet.

::

    fleet up            coordinator + one local agent in one process tree (single machine)
    fleet coordinator   the coordinator alone
    fleet agent         a node agent alone
    fleet engines       list engines (-o json|table)
    fleet nodes         list nodes (-o json|table)
    fleet deployments   declared deployments: desired, ready, and why not (-o json|table)
    fleet gpus          this machine's GPUs as NVML sees them
    fleet keys          CURVE keys for the agent link (docs/SECURITY.md)
    fleet demo-model    build the tiny offline demo model
    fleet chaos         the failure-recovery suite against a running fleet (chaos/README.md)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fleet import logjson
from fleet.keyscli import add_curve_arg, client_keys, server_keys, up_keys
from fleet.keyscli import add_parser as add_keys_parser
from fleet.nodescalecli import add_node_scale_args, node_scale_config
from fleet.protocol.errors import FleetError
from fleet.respcachecli import add_response_cache_args, response_cache_config
from fleet.storecli import (
    add_source_args,
    add_store_args,
    add_tokenizer_args,
    store_config,
    tokenizer_files,
)

DEFAULT_COORDINATOR = "http://127.0.0.1:8080"
DEFAULT_MODEL = ".fleet/models/demo"


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ``fleet`` command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmarks parse their own options, --help included
        from fleet.bench.cli import main as bench_main

        bench_main(argv[1:])
        return
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except FleetError as exc:
        print(f"fleet: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"fleet {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run a coordinator and a local agent (single machine)")
    _deployment_args(up)
    up.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default %(default)s)")
    up.add_argument("--port", type=int, default=8080, help="HTTP port (default %(default)s)")
    up.add_argument(
        "--agent-port",
        type=int,
        default=0,
        help="the local agent's HTTP port (default: any free port)",
    )
    up.add_argument(
        "--build-demo-model",
        action="store_true",
        help="build the demo model at --model first if it is not there",
    )
    up.add_argument(
        "--log-dir",
        type=Path,
        default=Path(".fleet/logs"),
        help="where fleet and engine logs go (default %(default)s)",
    )
    _observability_args(up, otel=True)
    up.add_argument(
        "--engine-startup-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="restart an engine not healthy this long after its start (default %(default)s)",
    )
    up.add_argument(
        "--coordinators",
        type=int,
        default=1,
        metavar="N",
        help="run N coordinator processes behind the one HTTP port, one leading placement "
        "(default %(default)s: one, in this process)",
    )
    _fake_gpus_arg(up, "the local agent reports")
    add_curve_arg(up, "up")
    add_store_args(up)
    add_tokenizer_args(up)
    up.set_defaults(func=_cmd_up)

    coord = sub.add_parser("coordinator", help="run the coordinator")
    _deployment_args(coord)
    coord.add_argument("--host", default="127.0.0.1")
    coord.add_argument("--port", type=int, default=8080)
    coord.add_argument(
        "--agent-endpoint",
        default="tcp://127.0.0.1:5555",
        help="ZMQ endpoint agents connect to (default %(default)s)",
    )
    coord.add_argument("--log-dir", type=Path, default=None)
    _observability_args(coord, otel=True)
    coord.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM, stop taking connections and give the requests in flight this long "
        "to finish (default %(default)s)",
    )
    coord.add_argument(
        "--hot-restart",
        action="store_true",
        help="keep the HTTP socket in a small parent process that starts the coordinator again "
        "at once when it dies, and gracefully on SIGHUP, without refusing a connection",
    )
    coord.add_argument(
        "--leader-lock",
        default=None,
        metavar="PATH",
        help="several coordinators on one machine: the one holding this lock file places "
        "engines (default: this is the only coordinator)",
    )
    coord.add_argument(
        "--leader-lease",
        default=None,
        metavar="NAMESPACE/NAME",
        help="several coordinators in a cluster: the holder of this coordination.k8s.io Lease "
        "places engines",
    )
    coord.add_argument(
        "--lease-duration",
        type=int,
        default=15,
        metavar="S",
        help="how long a silent leader keeps the Lease; it stops leading after two thirds of "
        "it without a renew (default %(default)s)",
    )
    coord.add_argument(
        "--kube-api",
        default=None,
        metavar="URL",
        help="the Kubernetes API server (default: in-cluster configuration, else kubeconfig)",
    )
    coord.add_argument(
        "--fleetmodels",
        default=None,
        metavar="NAMESPACE",
        help="serve the FleetModel custom resources of this namespace (every coordinator "
        "watches them; the leader writes their status)",
    )
    coord.add_argument(
        "--coordinators-expected",
        type=int,
        default=1,
        metavar="N",
        help="how many coordinators serve the fleet: without --redis-url (or while it is down) "
        "each enforces 1/N of every rate limit and of --max-queue (default %(default)s; "
        "`fleet up --coordinators N` passes N)",
    )
    coord.add_argument("--coordinator-id", default=None, help="this coordinator's name in logs")
    add_curve_arg(coord, "coordinator")
    add_node_scale_args(coord)
    add_source_args(coord)
    add_tokenizer_args(coord)
    coord.add_argument("--http-fd", type=int, default=None, help=argparse.SUPPRESS)
    coord.add_argument("--parent-fd", type=int, default=None, help=argparse.SUPPRESS)
    coord.set_defaults(func=_cmd_coordinator)

    agent = sub.add_parser("agent", help="run a node agent")
    where = agent.add_mutually_exclusive_group()
    where.add_argument(
        "--coordinator",
        default=None,
        help="the coordinator's agent endpoint; several: comma-separated (default "
        "tcp://127.0.0.1:5555)",
    )
    where.add_argument(
        "--coordinator-service",
        default=None,
        metavar="HOST:PORT",
        help="link to every address HOST resolves to (a headless Service of coordinators), "
        "on PORT, and follow it as coordinators come and go",
    )
    agent.add_argument(
        "--coordinator-resolve-interval",
        type=float,
        default=5.0,
        metavar="S",
        help="with --coordinator-service, resolve HOST this often (default %(default)s)",
    )
    agent.add_argument("--node-id", default=None, help="default: the host name")
    agent.add_argument("--http-host", default="127.0.0.1")
    agent.add_argument("--http-port", type=int, default=8081)
    agent.add_argument(
        "--engine-host",
        default="127.0.0.1",
        help="address engines listen on; the coordinator must reach it",
    )
    agent.add_argument("--log-dir", type=Path, default=Path(".fleet/logs"))
    _observability_args(agent, otel=False)
    agent.add_argument(
        "--engine-startup-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="restart an engine not healthy this long after its start (default %(default)s)",
    )
    _fake_gpus_arg(agent, "report")
    add_curve_arg(agent, "agent")
    add_store_args(agent)
    agent.set_defaults(func=_cmd_agent)

    add_keys_parser(sub)
    for name, what in (("engines", "engines"), ("nodes", "nodes")):
        p = sub.add_parser(name, help=f"list the fleet's {what}")
        p.add_argument("-o", "--output", choices=("table", "json"), default="table")
        p.add_argument(
            "--coordinator",
            default=os.environ.get("FLEET_COORDINATOR", DEFAULT_COORDINATOR),
            help="coordinator URL (default $FLEET_COORDINATOR or %(default)s)",
        )
        p.set_defaults(func=_cmd_list, what=what)

    from fleet import deploycli

    deploycli.add_parser(sub, DEFAULT_COORDINATOR)
    from fleet import modelscli

    modelscli.add_parser(sub, DEFAULT_COORDINATOR)

    route = sub.add_parser("route", help="ask the coordinator's scheduling pipeline")
    route_sub = route.add_subparsers(dest="route_cmd", required=True, metavar="COMMAND")
    explain = route_sub.add_parser(
        "explain", help="each engine's filter results and per-scorer scores for a prompt"
    )
    given = explain.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", help="the prompt text (a completion request)")
    given.add_argument("--chat", metavar="TEXT", help="a user message (a chat request)")
    explain.add_argument("--system", default=None, help="a system message before --chat")
    explain.add_argument("--model", default="demo", help="the model name (default %(default)s)")
    explain.add_argument("--session", default=None, help="an x-session-id to route with")
    explain.add_argument("-o", "--output", choices=("table", "json"), default="table")
    explain.add_argument(
        "--coordinator",
        default=os.environ.get("FLEET_COORDINATOR", DEFAULT_COORDINATOR),
        help="coordinator URL (default $FLEET_COORDINATOR or %(default)s)",
    )
    explain.add_argument(
        "--admin-key",
        default=os.environ.get("FLEET_ADMIN_KEY", ""),
        help="the coordinator's admin key, if it has one (default $FLEET_ADMIN_KEY)",
    )
    explain.set_defaults(func=_cmd_route_explain)

    chaos = sub.add_parser("chaos", help="the failure-recovery suite (chaos/README.md)")
    chaos_sub = chaos.add_subparsers(dest="chaos_cmd", required=True, metavar="COMMAND")
    chaos_list = chaos_sub.add_parser("list", help="the scenarios")
    chaos_list.set_defaults(func=_cmd_chaos)
    chaos_run = chaos_sub.add_parser("run", help="run scenarios against a running fleet")
    chaos_run.add_argument("scenarios", nargs="*", metavar="SCENARIO", help="default: all")
    chaos_run.add_argument(
        "--coordinator",
        default=os.environ.get("FLEET_COORDINATOR", DEFAULT_COORDINATOR),
        help="coordinator URL (default $FLEET_COORDINATOR or %(default)s)",
    )
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

    gpus = sub.add_parser("gpus", help="this machine's GPUs through NVML")
    gpus.add_argument("-o", "--output", choices=("table", "json"), default="table")
    _fake_gpus_arg(gpus, "show")
    gpus.set_defaults(func=_cmd_gpus)

    bench = sub.add_parser("bench", help="run a benchmark (see bench/README.md)", add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=_cmd_bench)

    demo = sub.add_parser("demo-model", help="build the tiny random-weight demo model offline")
    demo.add_argument("path", type=Path)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo_model)
    return parser


def _fake_gpus_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--fake-gpus",
        metavar="SPEC",
        default=None,
        help=f"{what} these GPUs instead of NVML's, for tests: NxSIZE[@TIER][:unhealthy] items, "
        "comma-separated (4x80GiB@h100,2x24GiB@l4:unhealthy); engines on them run as CPU engines, "
        "so use --engine sim or CPU vLLM",
    )


def _fake_gpus(args: argparse.Namespace) -> tuple[Any, ...]:
    """The parsed ``--fake-gpus`` (``()`` without it); a bad SPEC raises ConfigError."""
    from fleet.agent.fakenvml import parse_fake_gpus

    return parse_fake_gpus(args.fake_gpus) if args.fake_gpus is not None else ()


def _autoscale_args(p: argparse.ArgumentParser) -> None:
    """How deployments with minReplicas/maxReplicas scale (docs/DEPLOYMENTS.md)."""
    p.add_argument(
        "--autoscale-target",
        type=float,
        default=16.0,
        metavar="N",
        help="requests in flight per engine the autoscaler aims at (default %(default)s)",
    )
    p.add_argument(
        "--autoscale-window",
        type=float,
        default=60.0,
        metavar="S",
        help="the autoscaler's stable window; its panic window is a tenth of it "
        "(default %(default)s)",
    )
    p.add_argument(
        "--scale-to-zero-after",
        type=float,
        default=300.0,
        metavar="S",
        help="with minReplicas 0, stop the last engine after this long without "
        "requests (default %(default)s)",
    )
    p.add_argument(
        "--gpu-prices",
        default=None,
        metavar="TIER=DOLLARS,...",
        help="dollars per GPU-hour by tier (h100=4.10,l4=0.70): placement prefers the cheapest "
        "tier that fits; costs show in metrics and `fleet deployments`",
    )
    p.add_argument(
        "--tier-speeds",
        default=None,
        metavar="TIER=SPEED,...",
        help="how many autoscaler units (--autoscale-target requests) one engine of a tier holds "
        "(h100=3,l4=1; unlisted: 1): with --gpu-prices the autoscaler runs the cheapest mix",
    )
    p.add_argument("--engine-drain-timeout", type=float, default=30.0, metavar="S",
                   help="an engine scaled down or deleted stops once idle, or after this; its "
                   "streams then resume on another engine (default %(default)s)")  # fmt: skip


def _deployment_args(p: argparse.ArgumentParser) -> None:
    _autoscale_args(p)
    add_response_cache_args(p)
    p.add_argument(
        "--model",
        default=None,
        help=f"model folder the engines serve (default {DEFAULT_MODEL}; none with --deployments "
        "or --fleetmodels)",
    )
    p.add_argument(
        "--deployments",
        default=None,
        metavar="DIR",
        help="a folder of FleetModel YAML files to serve, re-read on change (docs/DEPLOYMENTS.md)",
    )
    p.add_argument(
        "--admin-key",
        default=os.environ.get("FLEET_ADMIN_KEY", ""),
        help="bearer key the admin API (/admin/v1/...) and the KV/cache inspection routes "
        "require (default $FLEET_ADMIN_KEY; empty: open, on loopback only)",
    )
    p.add_argument("--tls-cert", default=None, metavar="PEM",
                   help="serve HTTPS with this certificate (chain), with --tls-key")  # fmt: skip
    p.add_argument("--tls-key", default=None, metavar="PEM",
                   help="the private key of --tls-cert")  # fmt: skip
    p.add_argument(
        "--allow-open",
        action="store_true",
        help="serve beyond loopback (--host) without --admin-key and --api-keys: only on a "
        "network private by other means",
    )
    p.add_argument(
        "--model-name", default=None, help="the name clients use (default: the folder's name)"
    )
    p.add_argument("--engine", choices=("vllm", "sim"), default="vllm")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--gpus-per-engine", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=4 * 1024 * 1024,
        help="largest request body accepted; larger ones get 413 (default %(default)s)",
    )
    p.add_argument(
        "--kv-index-max-entries",
        type=int,
        default=5_000_000,
        help="most (block, engine) entries the KV index holds (default %(default)s, ~380 B each)",
    )
    p.add_argument(
        "--engine-slots",
        type=int,
        default=64,
        help="requests in flight per engine before requests queue in the coordinator "
        "(default %(default)s; see docs/RESILIENCE.md)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=500,
        help="requests waiting per model before new ones get 503 (default %(default)s)",
    )
    p.add_argument(
        "--max-queue-wait",
        type=float,
        default=30.0,
        metavar="S",
        help="the longest a request without a deadline (x-request-timeout) waits for an engine, "
        "e.g. while its deployment scales from zero (default %(default)s)",
    )
    p.add_argument(
        "--redis-url",
        default=None,
        metavar="URL",
        help="share rate limits and --max-queue among coordinators in this Redis, e.g. "
        "redis://127.0.0.1:6379/0 (default: each coordinator enforces its share; "
        "docs/RESILIENCE.md)",
    )
    p.add_argument(
        "--scheduler-config",
        default=None,
        metavar="FILE",
        help="an llm-d EndpointPickerConfig YAML file (default: Fleet's own, see docs/ROUTING.md)",
    )
    p.add_argument(
        "--api-keys",
        default=None,
        metavar="FILE",
        help="require these API keys (tiers, rate limits; see docs/RESILIENCE.md); default: open",
    )
    p.add_argument(
        "--resilience",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a breaker/retry/resume setting, e.g. stream_idle_s=10 (repeatable; the keys and "
        "defaults are in docs/RESILIENCE.md)",
    )
    p.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for every engine (repeatable)",
    )


def _version() -> str:
    from fleet import __version__

    return __version__


def _observability_args(parser: argparse.ArgumentParser, *, otel: bool) -> None:
    parser.add_argument(
        "--log-format",
        choices=logjson.FORMATS,
        default="text",
        help="text, or one JSON object per line with request_id and trace_id (default text)",
    )
    if otel:
        parser.add_argument(
            "--otel-endpoint",
            default=None,
            metavar="URL",
            help="send OpenTelemetry traces over OTLP/HTTP to URL (e.g. http://collector:4318; "
            "default: $OTEL_EXPORTER_OTLP_ENDPOINT, unset: tracing off); needs the `tracing` extra",
        )


@contextlib.contextmanager
def _tracing(args: argparse.Namespace) -> Iterator[None]:
    """Tracing on while inside when ``--otel-endpoint`` (or the OTLP variable) says so; the
    spans left are flushed on the way out."""
    from fleet.coordinator import tracing

    provider = tracing.configure(args.otel_endpoint)
    try:
        yield
    finally:
        if provider is not None:
            tracing.install(None)
            provider.shutdown()


def _setup_logging(log_dir: Path | None, *, verbose_stderr: bool, log_format: str) -> None:
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    fmt = logjson.formatter(log_format)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(logging.INFO if verbose_stderr else logging.WARNING)
    stderr.setFormatter(fmt)
    stderr.addFilter(logjson.RequestContext())
    root.addHandler(stderr)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_dir / "fleet.log")
        handler.setFormatter(fmt)
        handler.addFilter(logjson.RequestContext())
        root.addHandler(handler)
    for noisy in ("httpx", "httpcore", "hypercorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def scheduling(args: argparse.Namespace) -> Any:
    """The scheduling profile ``--scheduler-config`` names, loaded (None: the default).

    Raises:
        ConfigError: the file is unreadable or invalid (the message names plugin and profile).
    """
    if not args.scheduler_config:
        return None
    from fleet.coordinator.router.config import load_config_file

    return load_config_file(args.scheduler_config)


def resilience(args: argparse.Namespace) -> Any:
    """The breaker, retry and resume settings, defaults overridden by ``--resilience K=V``.

    Raises:
        ConfigError: an unknown key or a bad value.
    """
    import dataclasses

    from fleet.coordinator.resilience import ResilienceConfig
    from fleet.protocol.errors import ConfigError

    fields = {f.name: f for f in dataclasses.fields(ResilienceConfig)}
    values: dict[str, Any] = {}
    for item in args.resilience:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise ConfigError(
                "--resilience", item, f"needs KEY=VALUE with KEY one of {sorted(fields)}"
            )
        kind = str(fields[key].type)
        try:
            if text.lower() in ("none", "") and "None" in kind:
                values[key] = None
            elif kind.startswith("int"):
                values[key] = int(text)
            else:
                values[key] = float(text)
        except ValueError as exc:
            raise ConfigError("--resilience", item, "the value must be a number") from exc
    return ResilienceConfig(**values)


def api_keys(args: argparse.Namespace) -> Any:
    """The keys ``--api-keys`` lists (an empty set: the API is open).

    Raises:
        ConfigError: the file is unreadable or an entry is bad.
    """
    from fleet.coordinator.apikeys import ApiKeys, load_api_keys

    return load_api_keys(args.api_keys) if args.api_keys else ApiKeys()


def check_perimeter(args: argparse.Namespace, keys: bool) -> None:
    """Refuse to serve beyond loopback without keys (coordinator/perimeter.py).

    Raises:
        ConfigError: ``--host`` is not loopback and a key is missing, without ``--allow-open``.
    """
    from fleet.coordinator.perimeter import open_problem
    from fleet.protocol.errors import ConfigError

    problem = open_problem(
        args.host, admin_key=bool(args.admin_key), api_keys=bool(keys), allow_open=args.allow_open
    )
    if problem is not None:
        raise ConfigError("--host", args.host, problem)


def check_redis_url(args: argparse.Namespace) -> str | None:
    """``--redis-url``, checked (nothing is sent to it).

    Raises:
        ConfigError: not a Redis URL.
    """
    if args.redis_url:
        from fleet.coordinator.redislimits import connect

        connect(args.redis_url, 1.0).close()
    return args.redis_url  # type: ignore[no-any-return]


def _deployments(args: argparse.Namespace) -> tuple[Any, ...]:
    """The command line's one-model shorthand, if it is used: ``--model``, or no
    ``--deployments`` folder nor ``--fleetmodels`` (then the default model)."""
    if args.model is None and (args.deployments or getattr(args, "fleetmodels", None)):
        return ()
    if args.model is None:
        args.model = DEFAULT_MODEL
    return (_deployment(args),)


def _engine_defaults(args: argparse.Namespace) -> Any:
    from fleet.coordinator.deploybook import EngineDefaults

    return EngineDefaults(
        kind=args.engine,
        gpus_per_engine=args.gpus_per_engine,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        extra_args=tuple(args.engine_arg),
    )


def declared(args: argparse.Namespace) -> dict[str, Any]:
    """The CoordinatorConfig settings of declared deployments, from ``up``/``coordinator``
    flags.

    Raises:
        ConfigError: the deployments folder is not a folder.
    """
    from fleet.protocol.errors import ConfigError

    if args.deployments and not Path(args.deployments).is_dir():
        raise ConfigError("--deployments", args.deployments, "must be an existing folder")
    from fleet.coordinator.autoscale import AutoscaleConfig

    autoscale = AutoscaleConfig(
        target_per_engine=args.autoscale_target,
        stable_window_s=args.autoscale_window,
        panic_window_s=args.autoscale_window / 10,
        scale_to_zero_after_s=args.scale_to_zero_after,
    )
    from fleet.coordinator.costmix import parse_speeds
    from fleet.coordinator.costs import parse_prices

    return {
        "autoscale": autoscale,
        "gpu_prices": parse_prices(args.gpu_prices) if args.gpu_prices else {},
        "tier_speeds": parse_speeds(args.tier_speeds) if args.tier_speeds else {},
        "engine_drain_s": args.engine_drain_timeout,
        "deployments": _deployments(args),
        "deployments_dir": str(Path(args.deployments).resolve()) if args.deployments else None,
        "engine_defaults": _engine_defaults(args),
        "admin_key": args.admin_key,
    }


def _deployment(args: argparse.Namespace) -> Any:
    from fleet.coordinator.deployment import Deployment

    model_path = str(Path(args.model).resolve())
    name = args.model_name or Path(args.model).resolve().name
    return Deployment(
        model=name,
        model_path=model_path,
        replicas=args.replicas,
        kind=args.engine,
        gpus_per_engine=args.gpus_per_engine,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        extra_args=tuple(args.engine_arg),
    )


# -- fleet up -------------------------------------------------------------------------------


def _cmd_up(args: argparse.Namespace) -> int:
    import trio

    from fleet.up import run_up

    if args.coordinators < 1:
        raise FleetError(f"--coordinators must be at least 1, not {args.coordinators}")
    _setup_logging(args.log_dir, verbose_stderr=False, log_format=args.log_format)
    # bad flags fail before anything starts
    settings = (declared(args), scheduling(args), resilience(args), api_keys(args))
    check_perimeter(args, settings[3].enabled)
    check_redis_url(args)
    args.response_cache_cfg = response_cache_config(args)
    args.fake_gpus = _fake_gpus(args)
    args.store = store_config(args)
    args.tokenizer_files = tokenizer_files(args)
    args.curve = up_keys(args)  # (coordinator's, agent's) or None
    model = Path(args.model) if args.model is not None else None
    if model is not None and not (model / "config.json").exists():
        if not args.build_demo_model:
            raise FleetError(
                f"no model at {model} (build one with `fleet demo-model {model}`, "
                "or pass --build-demo-model)"
            )
        from fleet.demomodel import build_demo_model

        print(f"• building the demo model at {model} (offline, about 10 s)", flush=True)
        build_demo_model(model)
    if args.coordinators > 1:
        from fleet.upmany import run_up_many

        flags = _shared_flags(args, _parser_of("up"), _parser_of("coordinator"))
        return trio.run(run_up_many, args, flags, args.coordinators)
    with _tracing(args):
        return trio.run(run_up, args, *settings)


#: ``fleet up`` options a ``fleet coordinator`` child of ``--coordinators N`` does not inherit
#: (``--curve-keys DIR``: the children get ``DIR/coordinator``, fleet/upmany.py).
_UP_ONLY = {"host", "port", "log_dir", "func", "command", "curve_keys"}


def _parser_of(command: str) -> argparse.ArgumentParser:
    """The sub-parser of ``command``."""
    for action in _parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]  # type: ignore[no-any-return]
    raise KeyError(command)


def _shared_flags(
    args: argparse.Namespace, source: argparse.ArgumentParser, target: argparse.ArgumentParser
) -> list[str]:
    """The options ``args`` (parsed by ``source``) set away from their defaults that
    ``target`` takes too, as ``--flag=value`` arguments."""
    dests = {a.dest for a in target._actions if a.option_strings} - _UP_ONLY
    out: list[str] = []
    for action in source._actions:
        if action.dest not in dests or not action.option_strings:
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default or value is None:
            continue
        flag = next(o for o in action.option_strings if o.startswith("--"))
        if isinstance(action, argparse._StoreTrueAction):
            out.append(flag)
        elif isinstance(action, argparse._AppendAction):
            out += [f"{flag}={v}" for v in value]
        else:
            out.append(f"{flag}={value}")
    return out


def _cmd_coordinator(args: argparse.Namespace) -> int:
    import trio

    from fleet.coordinator.service import Coordinator, CoordinatorConfig

    _setup_logging(args.log_dir, verbose_stderr=True, log_format=args.log_format)
    keys = api_keys(args)
    if args.http_fd is None:  # a child of `fleet up --coordinators N`: its parent checked
        check_perimeter(args, keys.enabled)
    cfg = CoordinatorConfig(
        host=args.host,
        port=args.port,
        agent_endpoint=args.agent_endpoint,
        **declared(args),
        max_body_bytes=args.max_body_bytes,
        kv_index_max_entries=args.kv_index_max_entries,
        slots_per_engine=args.engine_slots,
        max_queue=args.max_queue,
        max_queue_wait_s=args.max_queue_wait,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        redis_url=check_redis_url(args),
        coordinators_expected=args.coordinators_expected,
        response_cache=response_cache_config(args),
        scheduling=scheduling(args),
        resilience=resilience(args),
        api_keys=keys,
        drain_s=args.drain_timeout,
        http_fd=args.http_fd,
        leader_lock=args.leader_lock,
        leader_lease=args.leader_lease,
        lease_duration_s=args.lease_duration,
        lease_renew_deadline_s=args.lease_duration * 2 / 3,
        kube_api=args.kube_api,
        fleetmodels_namespace=args.fleetmodels,
        node_scale=node_scale_config(args),
        curve_keys=server_keys(args),
        **({"coordinator_id": args.coordinator_id} if args.coordinator_id else {}),
    )
    files = tokenizer_files(args)
    if args.hot_restart:
        return _hot_restart(args)
    coordinator = Coordinator(cfg, tokenizer_files=files)
    with _tracing(args):
        return trio.run(_serve_until_signal, coordinator.run, coordinator.drain, args.parent_fd)


def _hot_restart(args: argparse.Namespace) -> int:
    import trio

    from fleet.coordinator.hotrestart import HotRestart, listen

    try:
        listener = listen(args.host, args.port)
    except OSError as exc:
        raise FleetError(f"cannot listen on {args.host}:{args.port}: {exc}") from exc
    logging.getLogger("fleet").info(
        "hot restart: listening on %s:%d; SIGHUP restarts the coordinator gracefully",
        args.host,
        listener.getsockname()[1],
    )
    argv = [a for a in sys.argv[1:] if a != "--hot-restart"]

    def child(http_fd: int, parent_fd: int) -> list[str]:
        return [sys.executable, "-m", "fleet", *argv, f"--http-fd={http_fd}",
                f"--parent-fd={parent_fd}"]  # fmt: skip

    return trio.run(HotRestart(child, listener).run)


def _cmd_agent(args: argparse.Namespace) -> int:
    import trio

    from fleet.agent.discovery import DiscoveryConfig, ServiceAddress
    from fleet.agent.launcher import LaunchConfig
    from fleet.agent.service import Agent, AgentConfig
    from fleet.agent.supervisor import SupervisorConfig

    _setup_logging(args.log_dir, verbose_stderr=True, log_format=args.log_format)
    kwargs: dict[str, Any] = {}
    if args.node_id:
        kwargs["node_id"] = args.node_id
    discovery = None
    if args.coordinator_service is not None:
        discovery = DiscoveryConfig(
            ServiceAddress.parse(args.coordinator_service),
            interval_s=args.coordinator_resolve_interval,
        )
    cfg = AgentConfig(
        coordinator_endpoint="" if discovery else args.coordinator or "tcp://127.0.0.1:5555",
        discovery=discovery,
        http_host=args.http_host,
        http_port=args.http_port,
        log_dir=args.log_dir,
        launch=LaunchConfig(host=args.engine_host),
        supervisor=SupervisorConfig(startup_timeout_s=args.engine_startup_timeout),
        fake_gpus=_fake_gpus(args),
        store=store_config(args),
        curve_keys=client_keys(args),
        **kwargs,
    )
    return trio.run(_serve_until_signal, Agent(cfg).run)  # an agent stops at once


async def _serve_until_signal(
    service_run: Any, drain: Any = None, parent_fd: int | None = None
) -> int:
    """Run a service until SIGINT or SIGTERM. With ``drain``, the first signal drains it (it
    returns by itself once drained) and a second one stops it at once; ``parent_fd`` (a hot
    restart's child) also drains it when its parent is gone."""
    import trio

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signals() -> None:
                draining = False
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if drain is None or draining:
                        logging.getLogger("fleet").warning("%s: stopping", name)
                        nursery.cancel_scope.cancel()
                        return
                    logging.getLogger("fleet").warning("%s: draining", name)
                    draining = True
                    drain()

            async def run(*, task_status: Any) -> None:
                await service_run(task_status=task_status)
                nursery.cancel_scope.cancel()  # it returned by itself (drained)

            nursery.start_soon(stop_on_signals)
            await nursery.start(run)
            if parent_fd is not None:
                from fleet.coordinator.hotrestart import watch_parent

                nursery.start_soon(watch_parent, parent_fd, drain)
    return 0


# -- inspection -----------------------------------------------------------------------------


def _ask_coordinator(coordinator: str, path: str, body: Any = None, admin_key: str = "") -> Any:
    """GET (or POST ``body`` to) the coordinator's ``path``; its JSON answer.

    Raises:
        FleetError: the coordinator is unreachable or answered with an error.
    """
    import httpx

    url = coordinator.rstrip("/") + path
    headers = {"authorization": f"Bearer {admin_key}"} if admin_key else {}
    try:
        if body is None:
            response = httpx.get(url, headers=headers, timeout=10)
        else:
            response = httpx.post(url, json=body, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise FleetError(f"cannot reach the coordinator at {coordinator}: {exc}") from exc
    if response.status_code != 200:
        raise FleetError(f"{url} answered {response.status_code}: {response.text[:300]}")
    return response.json()


def _cmd_list(args: argparse.Namespace) -> int:
    data = _ask_coordinator(args.coordinator, f"/api/v1/{args.what}")
    if args.output == "json":
        print(json.dumps(data, indent=2))
        return 0
    rows = data[args.what]
    if args.what == "engines":
        columns = ["id", "node", "model", "state", "role", "pid", "restarts", "url"]
    else:
        from fleet.modelscli import node_summary

        columns = ["id", "agent_url", "healthy", "lost", "gpus", "engines", "models"]
        rows = [
            r | {"gpus": _gpu_summary(r.get("gpus", [])), "models": node_summary(r)} for r in rows
        ]
    _table(columns, [[_cell(r.get(c)) for c in columns] for r in rows])
    return 0


def _gpu_summary(gpus: list[dict[str, Any]]) -> str:
    """A node's GPUs in one cell: ``0 1 2!`` (``!``: unhealthy), ``(fake)`` after fake ones."""
    marks = " ".join(f"{g.get('index')}{'' if g.get('healthy') else '!'}" for g in gpus)
    return marks + (" (fake)" if any(g.get("fake") for g in gpus) else "") if gpus else "-"


def _cmd_route_explain(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"model": args.model}
    if args.chat is not None:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        body["messages"] = [*messages, {"role": "user", "content": args.chat}]
    else:
        body["prompt"] = args.prompt
    if args.session:
        body["headers"] = {"x-session-id": args.session}
    data = _ask_coordinator(args.coordinator, "/api/v1/route/explain", body, args.admin_key)
    if args.output == "json":
        print(json.dumps(data, indent=2))
        return 0
    print(
        f"profile {data['profile']}: {data['prompt_tokens']} prompt tokens "
        f"(tokenized in {data['tokenize_ms']} ms), scheduled in {data['scheduling_ms']} ms"
    )
    _explain_table(data, data["candidates"])
    pd = data.get("pd")
    if pd:
        verdict = f"split, prefill on {data['prefill']}" if pd["split"] else "decode only"
        print(f"P/D ({pd['decider']}): {verdict}: {pd['reason']}")
    if data.get("prefill_candidates"):
        print(f"prefill profile {data['prefill_profile']['name']}:")
        _explain_table(data["prefill_profile"], data["prefill_candidates"])
    return 0


def _explain_table(profile: dict[str, Any], candidates: list[dict[str, Any]]) -> None:
    """Print one profile's candidates of a route explain answer."""
    scorers = [s["name"] for s in profile["scorers"]]
    columns = ["engine", *profile["filters"], "prefix tokens", *scorers, "total", "picked"]
    rows = []
    for c in candidates:
        filters = ["pass" if c["filters"].get(f) else "—" for f in profile["filters"]]
        scores = [
            f"{c['scores'][s]['score']:.3f} ×{c['scores'][s]['weight']:g}"
            if s in c.get("scores", {})
            else "—"
            for s in scorers
        ]
        prefix = c.get("prefix", {})
        rows.append(
            [
                c["engine"],
                *filters,
                f"{prefix.get('tokens', 0)} ({prefix.get('blocks', 0)}/{prefix.get('of', 0)})"
                if prefix
                else "—",
                *scores,
                _cell(c.get("total", "—")),
                "◀" if c.get("selected") else "",
            ]
        )
    _table(columns, rows)


def _cmd_gpus(args: argparse.Namespace) -> int:
    from fleet.agent.fakenvml import FakeNvml
    from fleet.agent.gpus import discover

    fake = _fake_gpus(args)
    gpus = discover(FakeNvml(fake) if fake else None)
    if args.output == "json":
        print(json.dumps({"gpus": [g.__dict__ | {"xids": list(g.xids)} for g in gpus]}, indent=2))
        return 0
    columns = [
        "index",
        "name",
        "uuid",
        "memory_used_bytes",
        "memory_total_bytes",
        "utilization_pct",
        "temperature_c",
        "power_w",
        "healthy",
        "fake",
    ]
    _table(columns, [[_cell(getattr(g, c)) for c in columns] for g in gpus])
    if any(g.fake for g in gpus):
        print("fake=True: a GPU from --fake-gpus, not NVML's; its engines run on CPU")
    if not gpus:
        print("no GPUs found through NVML: this node runs CPU engines only")
    return 0


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


def _cell(value: object) -> str:
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    return "-" if value is None or value == "" else str(value)


def _table(columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in columns:
        table.add_column(column.upper())
    for row in rows:
        table.add_row(*row)
    Console().print(table)


__all__ = ["main"]
