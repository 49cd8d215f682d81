"""``fleet deployments`` (every declared deployment's status) and ``fleet deploy -f FILE``
(create or replace deployments from FleetModel YAML, optionally waiting until they are ready),
through the coordinator's admin API (``/admin/v1/deployments``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.text import Text

from fleet import cliout
from fleet.cliconn import add_coordinator_args, answer, call
from fleet.cliout import cell, table
from fleet.cliprogress import Tracker
from fleet.modelscli import fetch_line
from fleet.protocol.errors import ConfigError, FleetError

POLL_S = 0.5


def add_parsers(sub: Any) -> None:
    """Add ``fleet deployments`` and ``fleet deploy`` to the ``fleet`` subparsers."""
    p = sub.add_parser("deployments", help="declared deployments: desired, ready, and why not")
    cliout.add_output_args(p)
    add_coordinator_args(p)
    p.set_defaults(func=run)

    d = sub.add_parser("deploy", help="create or replace deployments from FleetModel YAML")
    d.add_argument(
        "-f", "--filename", required=True, metavar="FILE",
        help="a FleetModel YAML file, several documents allowed (- reads stdin)",
    )  # fmt: skip
    d.add_argument("--wait", action="store_true", help="wait until every engine is ready")
    d.add_argument(
        "--timeout", type=float, default=600.0, metavar="S",
        help="with --wait, give up (exit 1) after this long (default %(default)s)",
    )  # fmt: skip
    add_coordinator_args(d)
    d.set_defaults(func=run_deploy)


def fetch(coordinator: str, admin_key: str = "") -> dict[str, Any]:
    """``GET /admin/v1/deployments``.

    Raises:
        FleetError: the coordinator is unreachable or answered with an error.
    """
    data: dict[str, Any] = call(coordinator, "/admin/v1/deployments", admin_key)
    return data


def render(data: dict[str, Any], wide: bool) -> RenderableType:
    """``fleet deployments``' table (``wide``: also origin, source and each engine's state)."""
    columns = ["name", "served", "version", "weight", "desired", "placed", "ready", "$/hour"]
    columns += ["origin", "source", "engines", "why"] if wide else ["why"]
    rows = []
    for d in data["deployments"]:
        why = "; ".join(f"{k}: {v}" for k, v in d["reasons"].items()) or "-"
        ready = Text(str(d["ready"]), style="green" if d["ready"] >= d["desired"] else "yellow")
        row: list[RenderableType] = [
            d["name"], ",".join(d["servedModelNames"]), d["version"] or "-",
            str(d["trafficWeight"]), str(d["desired"]), str(d["placed"]), ready,
            f"{d.get('costPerHour', 0.0):.2f}",
        ]  # fmt: skip
        if wide:
            engines = " ".join(f"{e['id']}={e['state']}" for e in d.get("engines", []))
            row += [cell(d.get("origin")), cell(d.get("source")), engines or "-"]
        rows.append([*row, why])
    total = sum(d.get("costPerHour", 0.0) for d in data["deployments"])
    parts: list[RenderableType] = [table(columns, rows), Text(f"fleet: ${total:.2f} per hour "
                                                              "(--gpu-prices)")]  # fmt: skip
    if data.get("folderError"):
        parts.append(Text(f"deployments folder not applied: {data['folderError']}", style="red"))
    return Group(*parts)


def run(args: argparse.Namespace) -> int:
    return cliout.show(args, lambda: fetch(args.coordinator, args.admin_key), render)


def load_documents(path: str) -> list[dict[str, Any]]:
    """The FleetModel documents of a YAML file (``-``: stdin), each with a ``metadata.name``.

    Raises:
        ConfigError: unreadable, not YAML, a document that is not a mapping, or no name.
    """
    import yaml

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except OSError as exc:
        raise ConfigError("--filename", path, f"cannot be read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError("--filename", path, f"is not YAML: {exc}") from exc
    if not docs:
        raise ConfigError("--filename", path, "holds no document")
    for i, doc in enumerate(docs):
        name = doc.get("metadata", {}).get("name") if isinstance(doc, dict) else None
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{path}: document {i + 1}: metadata.name", name, "is required")
    return docs


def run_deploy(args: argparse.Namespace) -> int:
    docs = load_documents(args.filename)
    names = []
    for doc in docs:
        name = doc["metadata"]["name"]
        path = f"/admin/v1/deployments/{name}"
        status, entry = answer(args.coordinator, path, args.admin_key, doc, method="PUT")
        verb = "created" if status == 201 else "configured"  # the PUT's own answer: no race
        print(f"deployment {name} {verb} (desired {entry['desired']})", flush=True)
        names.append(name)
    if args.wait:
        wait_ready(args.coordinator, args.admin_key, names, args.timeout)
    return 0


def wait_ready(coordinator: str, admin_key: str, names: list[str], timeout_s: float) -> None:
    """Wait until each deployment of ``names`` has ``desired`` ready engines, showing a bar
    per deployment and per model download.

    Raises:
        FleetError: not ready within ``timeout_s`` (the message says why not), or the
            coordinator failed.
    """
    deadline = time.monotonic() + timeout_s
    with Tracker() as bars:
        while True:
            entries = [call(coordinator, f"/admin/v1/deployments/{n}", admin_key) for n in names]
            for d in entries:
                bars.update(d["name"], f"{d['name']}: {d['ready']}/{d['desired']} ready",
                            d["ready"], d["desired"] or 1)  # fmt: skip
            sources = {d["source"] for d in entries}
            for node in call(coordinator, "/api/v1/nodes")["nodes"]:
                for f in node.get("fetches", []):
                    if f["uri"] in sources and f["state"] != "failed":
                        bars.update(f"{node['id']} {f['uri']}", f"{node['id']}: {fetch_line(f)}",
                                    f["bytes_done"], f["bytes_total"] or None)  # fmt: skip
            if all(d["ready"] >= d["desired"] for d in entries):
                for d in entries:
                    bars.update(d["name"], f"{d['name']}: {d['ready']}/{d['desired']} ready",
                                d["desired"] or 1, d["desired"] or 1)  # fmt: skip
                return
            if time.monotonic() > deadline:
                why = "; ".join(
                    f"{d['name']} {d['ready']}/{d['desired']} ready"
                    + "".join(f", {k}: {v}" for k, v in d["reasons"].items())
                    for d in entries
                    if d["ready"] < d["desired"]
                )
                raise FleetError(f"not ready within {timeout_s:g} s: {why}")
            time.sleep(POLL_S)


__all__ = ["add_parsers", "fetch", "load_documents", "render", "run", "run_deploy", "wait_ready"]
