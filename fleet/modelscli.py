"""``fleet models``: what each node's model store holds or is fetching, and pre-staging.

``fleet models [-o json]`` reads ``/api/v1/nodes`` (every node's ``models`` and ``fetches``, as
its heartbeats report them). ``fleet models prestage NAME [--nodes a,b]`` posts to
``/admin/v1/prestage`` (NAME is a deployment, or a source URI when it contains ``://``) and
prints each node's status; ``--wait`` follows each node's download with a progress bar until
the model is cached (or ``fleet models --watch``).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from rich.console import RenderableType

from fleet import cliout
from fleet.cliconn import add_coordinator_args, call
from fleet.cliprogress import Tracker
from fleet.protocol.errors import FleetError


def add_parser(sub: Any) -> None:
    """Add ``fleet models`` and ``fleet models prestage`` to the ``fleet`` subparsers."""
    p = sub.add_parser("models", help="models cached or being fetched on each node; prestage")
    add_coordinator_args(p, admin=False)
    cliout.add_output_args(p)
    p.set_defaults(func=run_list)
    msub = p.add_subparsers(dest="models_cmd", metavar="COMMAND")
    pre = msub.add_parser("prestage", help="fetch a model onto nodes before engines need it")
    pre.add_argument("name", metavar="NAME", help="a deployment, or a source URI (has ://)")
    pre.add_argument("--nodes", default="", help="comma-separated node ids (default: all live)")
    pre.add_argument(
        "--wait", action="store_true", help="show each node's download until it is cached"
    )
    pre.add_argument(
        "--timeout", type=float, default=3600.0, metavar="S",
        help="with --wait, give up (exit 1) after this long (default %(default)s)",
    )  # fmt: skip
    add_coordinator_args(pre)
    cliout.add_output_args(pre, watch=False)
    pre.set_defaults(func=run_prestage)


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


def model_rows(data: dict[str, Any]) -> dict[str, Any]:
    """``fleet models -o json``: one row per cached model or fetch on each node of
    ``/api/v1/nodes``."""
    rows: list[dict[str, Any]] = []
    for node in data["nodes"]:
        for m in node.get("models", []):
            state = "cached (in use)" if m["pinned"] else "cached"
            rows.append({"node": node["id"], "source": m["uri"], "size": size(m["size_bytes"]),
                         "state": state, "bytes": m["size_bytes"]})  # fmt: skip
        for f in node.get("fetches", []):
            rows.append({"node": node["id"], "source": f["uri"], "size": size(f["bytes_total"]),
                         "state": fetch_line(f), "fetch": f})  # fmt: skip
    return {"models": rows}


def render_models(data: dict[str, Any], wide: bool) -> RenderableType:
    """``fleet models``' table (``wide``: also the exact size in bytes)."""
    columns = ["node", "source", "size", "state"] + (["bytes"] if wide else [])
    rows = [
        [r["node"], r["source"], r["size"], r["state"]]
        + ([str(r.get("bytes", r.get("fetch", {}).get("bytes_total", "-")))] if wide else [])
        for r in data["models"]
    ]
    return cliout.table(columns, rows)


def run_list(args: argparse.Namespace) -> int:
    return cliout.show(
        args, lambda: model_rows(call(args.coordinator, "/api/v1/nodes")), render_models
    )


def run_prestage(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"source" if "://" in args.name else "deployment": args.name}
    if args.nodes:
        body["nodes"] = [n.strip() for n in args.nodes.split(",") if n.strip()]
    data = call(args.coordinator, "/admin/v1/prestage", args.admin_key, body)
    if args.output in ("json", "yaml"):
        print(cliout.dump(data, args.output), flush=True)
    else:
        print(
            f"prestaging {data['source']}"
            + (f" ({data['deployment']})" if data["deployment"] else ""),
            flush=True,
        )
        rows = [[n["node"], n["state"], n.get("error", "") or "-"] for n in data["nodes"]]
        cliout.console().print(cliout.table(["node", "state", "detail"], rows))
    if args.wait:
        wait_cached(args.coordinator, data["source"], [n["node"] for n in data["nodes"]],
                    args.timeout)  # fmt: skip
    return 0


def wait_cached(coordinator: str, uri: str, nodes: list[str], timeout_s: float) -> None:
    """Show each node's download of ``uri`` until every one of ``nodes`` has it cached.

    Raises:
        FleetError: a download failed, or did not finish within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    with Tracker() as bars:
        while True:
            by_id = {n["id"]: n for n in call(coordinator, "/api/v1/nodes")["nodes"]}
            waiting = []
            for node_id in nodes:
                node = by_id.get(node_id, {})
                cached = next((m for m in node.get("models", []) if m["uri"] == uri), None)
                fetch = next((f for f in node.get("fetches", []) if f["uri"] == uri), None)
                if cached is not None:
                    total = cached["size_bytes"] or 1
                    bars.update(node_id, f"{node_id}: cached, {size(total)}", total, total)
                    continue
                if fetch is not None and fetch["state"] == "failed":
                    raise FleetError(f"{node_id}: fetching {uri} failed: {fetch['error']}")
                waiting.append(node_id)
                if fetch is None:
                    bars.update(node_id, f"{node_id}: queued", 0, None)
                else:
                    bars.update(node_id, f"{node_id}: {fetch_line(fetch)}", fetch["bytes_done"],
                                fetch["bytes_total"] or None)  # fmt: skip
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise FleetError(f"{uri} not cached within {timeout_s:g} s on {waiting}")
            time.sleep(0.5)


__all__ = [
    "add_parser",
    "fetch_line",
    "model_rows",
    "node_summary",
    "render_models",
    "run_list",
    "run_prestage",
    "size",
    "wait_cached",
]
