"""The deployment flags ``fleet up`` and ``fleet coordinator`` share: the one-model shorthand,
autoscaling, admission, keys and engine settings (docs/DEPLOYMENTS.md)."""

from __future__ import annotations

import argparse
import os

from fleet.respcachecli import add_response_cache_args

DEFAULT_MODEL = ".fleet/models/demo"


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


def deployment_args(p: argparse.ArgumentParser) -> None:
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


__all__ = ["DEFAULT_MODEL", "deployment_args"]
