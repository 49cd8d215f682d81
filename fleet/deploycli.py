"""``fleet deployments``: every declared deployment's status, from the coordinator's admin API."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from fleet.protocol.errors import FleetError


def add_parser(sub: Any, default_coordinator: str) -> None:
    """Add ``fleet deployments [-o json]`` to the ``fleet`` command's subparsers."""
    p = sub.add_parser("deployments", help="declared deployments: desired, ready, and why not")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.add_argument(
        "--coordinator",
        default=os.environ.get("FLEET_COORDINATOR", default_coordinator),
        help="coordinator URL (default $FLEET_COORDINATOR or %(default)s)",
    )
    p.add_argument(
        "--admin-key",
        default=os.environ.get("FLEET_ADMIN_KEY", ""),
        help="the coordinator's admin key (default $FLEET_ADMIN_KEY)",
    )
    p.set_defaults(func=run)


def fetch(coordinator: str, admin_key: str = "") -> dict[str, Any]:
    """``GET /admin/v1/deployments``.

    Raises:
        FleetError: the coordinator is unreachable or answered with an error.
    """
    import httpx

    headers = {"authorization": f"Bearer {admin_key}"} if admin_key else {}
    url = coordinator.rstrip("/") + "/admin/v1/deployments"
    try:
        response = httpx.get(url, headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        raise FleetError(f"cannot reach the coordinator at {coordinator}: {exc}") from exc
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise FleetError(f"{url}: {response.status_code}: {message}")
    data: dict[str, Any] = response.json()
    return data


def run(args: argparse.Namespace) -> int:
    data = fetch(args.coordinator, args.admin_key)
    if args.output == "json":
        print(json.dumps(data, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in ("name", "served", "version", "weight", "desired", "placed", "ready", "why"):
        table.add_column(column.upper())
    for d in data["deployments"]:
        why = "; ".join(f"{k}: {v}" for k, v in d["reasons"].items()) or "-"
        table.add_row(
            d["name"], ",".join(d["servedModelNames"]), d["version"] or "-",
            str(d["trafficWeight"]), str(d["desired"]), str(d["placed"]), str(d["ready"]), why,
        )  # fmt: skip
    console = Console()
    console.print(table)
    if data.get("folderError"):
        console.print(f"[bold red]deployments folder not applied:[/] {data['folderError']}")
    return 0


__all__ = ["add_parser", "fetch", "run"]
