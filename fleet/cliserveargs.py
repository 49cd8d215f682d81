"""The parsers of ``fleet up``, ``fleet coordinator`` and ``fleet agent`` (the serving
commands); their deployment flags are in :mod:`fleet.clideployargs`."""

from __future__ import annotations

import argparse
from pathlib import Path

from fleet import logjson
from fleet.clideployargs import deployment_args
from fleet.keyscli import add_curve_arg
from fleet.nodescalecli import add_node_scale_args
from fleet.storecli import add_source_args, add_store_args, add_tokenizer_args


def add_serve_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``up``, ``coordinator`` and ``agent`` to the ``fleet`` subparsers; return the agent's
    (``fleet agent inspect`` hangs below it)."""
    from fleet import cliserve

    up = sub.add_parser("up", help="run a coordinator and a local agent (single machine)")
    deployment_args(up)
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
    observability_args(up, otel=True)
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
    fake_gpus_arg(up, "the local agent reports")
    add_curve_arg(up, "up")
    add_store_args(up)
    add_tokenizer_args(up)
    up.set_defaults(func=cliserve.cmd_up)

    coord = sub.add_parser("coordinator", help="run the coordinator")
    deployment_args(coord)
    coord.add_argument("--host", default="127.0.0.1")
    coord.add_argument("--port", type=int, default=8080)
    coord.add_argument(
        "--agent-endpoint",
        default="tcp://127.0.0.1:5555",
        help="ZMQ endpoint agents connect to (default %(default)s)",
    )
    coord.add_argument("--log-dir", type=Path, default=None)
    observability_args(coord, otel=True)
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
    coord.set_defaults(func=cliserve.cmd_coordinator)

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
    observability_args(agent, otel=False)
    agent.add_argument(
        "--engine-startup-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="restart an engine not healthy this long after its start (default %(default)s)",
    )
    fake_gpus_arg(agent, "report")
    add_curve_arg(agent, "agent")
    add_store_args(agent)
    agent.set_defaults(func=cliserve.cmd_agent)
    return agent


def fake_gpus_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--fake-gpus",
        metavar="SPEC",
        default=None,
        help=f"{what} these GPUs instead of NVML's, for tests: NxSIZE[@TIER][:unhealthy] items, "
        "comma-separated (4x80GiB@h100,2x24GiB@l4:unhealthy); engines on them run as CPU engines, "
        "so use --engine sim or CPU vLLM",
    )


def observability_args(parser: argparse.ArgumentParser, *, otel: bool) -> None:
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


__all__ = ["add_serve_parsers", "fake_gpus_arg", "observability_args"]
