"""``fleet deployments``: every declared deployment's status, from the coordinator's admin API."""

from __future__ import annotations

import argparse
import json
from typing import Any

from fleet.modelscli import call, coordinator_args


def add_parser(sub: Any, default_coordinator: str) -> None:
    """Add ``fleet deployments [-o json]`` to the ``fleet`` command's subparsers."""
    p = sub.add_parser("deployments", help="declared deployments: desired, ready, and why not")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    coordinator_args(p, default_coordinator)
    p.set_defaults(func=run)


def fetch(coordinator: str, admin_key: str = "") -> dict[str, Any]:
    """``GET /admin/v1/deployments``.

    Raises:
        FleetError: the coordinator is unreachable or answered with an error.
    """
    return call(coordinator, "/admin/v1/deployments", admin_key)


def run(args: argparse.Namespace) -> int:
    data = fetch(args.coordinator, args.admin_key)
    if args.output == "json":
        print(json.dumps(data, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    columns = ("name", "served", "version", "weight", "desired", "placed", "ready", "$/hour", "why")
    for column in columns:
        table.add_column(column.upper())
    for d in data["deployments"]:
        why = "; ".join(f"{k}: {v}" for k, v in d["reasons"].items()) or "-"
        table.add_row(
            d["name"], ",".join(d["servedModelNames"]), d["version"] or "-",
            str(d["trafficWeight"]), str(d["desired"]), str(d["placed"]), str(d["ready"]),
            f"{d.get('costPerHour', 0.0):.2f}", why,
        )  # fmt: skip
    console = Console()
    console.print(table)
    total = sum(d.get("costPerHour", 0.0) for d in data["deployments"])
    console.print(f"fleet: ${total:.2f} per hour (--gpu-prices)")
    if data.get("folderError"):
        console.print(f"[bold red]deployments folder not applied:[/] {data['folderError']}")
    return 0


__all__ = ["add_parser", "fetch", "run"]
