"""``fleet models``: what each node's model store holds or is fetching, and pre-staging.

``fleet models [-o json]`` reads ``/api/v1/nodes`` (every node's ``models`` and ``fetches``, as
its heartbeats report them). ``fleet models prestage NAME [--nodes a,b]`` posts to
``/admin/v1/prestage`` (NAME is a deployment, or a source URI when it contains ``://``) and
prints each node's status; run ``fleet models`` to follow the download.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from fleet.protocol.errors import FleetError


def add_parser(sub: Any, default_coordinator: str) -> None:
    """Add ``fleet models`` and ``fleet models prestage`` to the ``fleet`` subparsers."""
    p = sub.add_parser("models", help="models cached or being fetched on each node; prestage")
    coordinator_args(p, default_coordinator)
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(func=run_list)
    msub = p.add_subparsers(dest="models_cmd", metavar="COMMAND")
    pre = msub.add_parser("prestage", help="fetch a model onto nodes before engines need it")
    pre.add_argument("name", metavar="NAME", help="a deployment, or a source URI (has ://)")
    pre.add_argument("--nodes", default="", help="comma-separated node ids (default: all live)")
    coordinator_args(pre, default_coordinator)
    pre.add_argument("-o", "--output", choices=("table", "json"), default="table")
    pre.set_defaults(func=run_prestage)


def coordinator_args(p: Any, default_coordinator: str) -> None:
    """``--coordinator`` and ``--admin-key``, for commands that call the admin API."""
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


def call(coordinator: str, path: str, admin_key: str = "", body: Any = None) -> dict[str, Any]:
    """GET (or POST ``body`` to) ``path``; the JSON answer.

    Raises:
        FleetError: the coordinator is unreachable or answered with an error (its message).
    """
    import httpx

    headers = {"authorization": f"Bearer {admin_key}"} if admin_key else {}
    url = coordinator.rstrip("/") + path
    try:
        if body is None:
            response = httpx.get(url, headers=headers, timeout=10)
        else:
            response = httpx.post(url, json=body, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise FleetError(f"cannot reach the coordinator at {coordinator}: {exc}") from exc
    if response.status_code >= 300:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise FleetError(f"{url}: {response.status_code}: {message}")
    data: dict[str, Any] = response.json()
    return data


def size(n: float) -> str:
    """Bytes for people: ``512 B``, ``1.5 MiB``, ``3.2 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def fetch_line(f: dict[str, Any]) -> str:
    """One fetch as a node reports it: ``downloading 1.0/4.0 GiB, 50.0 MiB/s, ETA 60 s``."""
    if f["state"] == "failed":
        return f"failed: {f.get('error', '')}"
    if f["state"] == "listing":
        return "listing files"
    text = f"downloading {size(f['bytes_done'])}/{size(f['bytes_total'])}"
    if f.get("rate_bps"):
        text += f", {size(f['rate_bps'])}/s"
    if f.get("eta_s") is not None:
        text += f", ETA {f['eta_s']:.0f} s"
    return text


def node_summary(node: dict[str, Any]) -> str:
    """A node's store in one cell of ``fleet nodes``: ``2 cached, 1 fetching 45%``."""
    parts = [f"{len(node.get('models', []))} cached"] if node.get("models") else []
    fetches = node.get("fetches", [])
    live = [f for f in fetches if f["state"] != "failed"]
    if live:
        done = sum(f["bytes_done"] for f in live)
        total = sum(f["bytes_total"] for f in live)
        pct = f" {100 * done // total}%" if total else ""
        parts.append(f"{len(live)} fetching{pct}")
    if len(live) < len(fetches):
        parts.append(f"{len(fetches) - len(live)} failed")
    return ", ".join(parts) or "-"


def run_list(args: argparse.Namespace) -> int:
    data = call(args.coordinator, "/api/v1/nodes")
    rows: list[dict[str, Any]] = []
    for node in data["nodes"]:
        for m in node.get("models", []):
            state = "cached (in use)" if m["pinned"] else "cached"
            rows.append({"node": node["id"], "source": m["uri"], "size": size(m["size_bytes"]),
                         "state": state, "bytes": m["size_bytes"]})  # fmt: skip
        for f in node.get("fetches", []):
            rows.append({"node": node["id"], "source": f["uri"], "size": size(f["bytes_total"]),
                         "state": fetch_line(f), "fetch": f})  # fmt: skip
    if args.output == "json":
        print(json.dumps({"models": rows}, indent=2))
        return 0
    _print(["node", "source", "size", "state"], rows)
    return 0


def run_prestage(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"source" if "://" in args.name else "deployment": args.name}
    if args.nodes:
        body["nodes"] = [n.strip() for n in args.nodes.split(",") if n.strip()]
    data = call(args.coordinator, "/admin/v1/prestage", args.admin_key, body)
    if args.output == "json":
        print(json.dumps(data, indent=2))
        return 0
    print(
        f"prestaging {data['source']}" + (f" ({data['deployment']})" if data["deployment"] else "")
    )
    rows = [
        {"node": n["node"], "state": n["state"], "detail": n.get("error", "")}
        for n in data["nodes"]
    ]
    _print(["node", "state", "detail"], rows)
    return 0


def _print(columns: list[str], rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in columns:
        table.add_column(column.upper())
    for row in rows:
        table.add_row(*(str(row.get(c, "")) or "-" for c in columns))
    Console().print(table)


__all__ = ["add_parser", "call", "fetch_line", "node_summary", "run_list", "run_prestage", "size"]
