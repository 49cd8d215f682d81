"""``fleet engines``, ``fleet nodes``, ``fleet node inspect NODE`` and ``fleet gpus``.

The first three read the coordinator's ``/api/v1/engines`` and ``/api/v1/nodes``; ``fleet
gpus`` reads this machine's NVML. Each prints ``-o table|wide|json|yaml`` and takes ``--watch``
(:mod:`fleet.cliout`); ``node inspect`` exits 1 when the fleet has no such node.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Group, RenderableType
from rich.text import Text

from fleet import cliout
from fleet.cliconn import NotFound, add_coordinator_args, call
from fleet.cliout import cell, state, table, yes_no
from fleet.modelscli import fetch_line, node_summary, size


def add_parsers(sub: Any, fake_gpus_arg: Any) -> None:
    """Add ``engines``, ``nodes``, ``node inspect`` and ``gpus`` to the ``fleet`` subparsers."""
    engines = sub.add_parser("engines", help="list the fleet's engines")
    cliout.add_output_args(engines)
    add_coordinator_args(engines, admin=False)
    engines.set_defaults(func=_engines)

    nodes = sub.add_parser("nodes", help="list the fleet's nodes")
    cliout.add_output_args(nodes)
    add_coordinator_args(nodes, admin=False)
    nodes.set_defaults(func=_nodes)

    node = sub.add_parser("node", help="one node in detail")
    node_sub = node.add_subparsers(dest="node_cmd", required=True, metavar="COMMAND")
    inspect = node_sub.add_parser(
        "inspect", help="a node's GPUs (health, XIDs, engines on each), model cache, heartbeat"
    )
    inspect.add_argument("node", metavar="NODE", help="the node id (`fleet nodes`)")
    cliout.add_output_args(inspect)
    add_coordinator_args(inspect, admin=False)
    inspect.set_defaults(func=_node_inspect)

    gpus = sub.add_parser("gpus", help="this machine's GPUs through NVML")
    cliout.add_output_args(gpus)
    fake_gpus_arg(gpus, "show")
    gpus.set_defaults(func=_gpus)


# -- fleet engines ----------------------------------------------------------------------------


def render_engines(data: dict[str, Any], wide: bool) -> RenderableType:
    """``fleet engines``' table (``wide``: also kind, tier, GPUs, block size, routable)."""
    columns = ["id", "node", "model", "state", "role", "pid", "restarts", "url"]
    if wide:
        columns += ["kind", "tier", "gpus", "block size", "routable"]
    rows = []
    for e in data["engines"]:
        row: list[RenderableType] = [
            e["id"], e["node"], e["model"], state(e["state"]), cell(e.get("role")),
            cell(e.get("pid")), str(e.get("restarts", 0)), cell(e.get("url")),
        ]  # fmt: skip
        if wide:
            routable = yes_no(e.get("routable"), bad_when=False)
            row += [cell(e.get("kind")), cell(e.get("tier")), cell(e.get("gpus")),
                    cell(e.get("block_size")), routable]  # fmt: skip
        rows.append(row)
    return table(columns, rows)


def _engines(args: argparse.Namespace) -> int:
    return cliout.show(args, lambda: call(args.coordinator, "/api/v1/engines"), render_engines)


# -- fleet nodes ------------------------------------------------------------------------------


def gpu_summary(gpus: list[dict[str, Any]]) -> str:
    """A node's GPUs in one cell: ``0 1 2!`` (``!``: unhealthy), ``(fake)`` after fake ones."""
    marks = " ".join(f"{g.get('index')}{'' if g.get('healthy') else '!'}" for g in gpus)
    return marks + (" (fake)" if any(g.get("fake") for g in gpus) else "") if gpus else "-"


def age(seconds: float | None) -> str:
    """A heartbeat's age: ``0.4 s``, ``12 s``, ``3m05s``."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def _node_state(n: dict[str, Any]) -> Text:
    return state("lost" if n.get("lost") else "healthy" if n.get("healthy") else "unhealthy")


def render_nodes(data: dict[str, Any], wide: bool) -> RenderableType:
    """``fleet nodes``' table (``wide``: also version, GPU models and memory)."""
    columns = ["id", "state", "gpus", "engines", "models", "heartbeat", "agent url"]
    if wide:
        columns += ["version", "gpu models", "gpu memory used"]
    rows = []
    for n in data["nodes"]:
        gpus = n.get("gpus", [])
        row: list[RenderableType] = [
            n["id"], _node_state(n), gpu_summary(gpus), str(len(n.get("engines", []))),
            node_summary(n), age(n.get("heartbeat_age_s")), cell(n.get("agent_url")),
        ]  # fmt: skip
        if wide:
            names = sorted({g["name"] for g in gpus})
            used = sum(g["memory_used_bytes"] for g in gpus)
            total = sum(g["memory_total_bytes"] for g in gpus)
            memory = f"{size(used)} / {size(total)}" if gpus else "-"
            row += [cell(n.get("agent_version")), cell(names), memory]
        rows.append(row)
    return table(columns, rows)


def _nodes(args: argparse.Namespace) -> int:
    return cliout.show(args, lambda: call(args.coordinator, "/api/v1/nodes"), render_nodes)


# -- fleet node inspect -----------------------------------------------------------------------


def fetch_node(coordinator: str, node_id: str) -> dict[str, Any]:
    """One node as ``node inspect -o json`` prints it: the node (``/api/v1/nodes``), every
    engine on it, and for each GPU the ids of the engines using it.

    Raises:
        NotFound: the fleet has no node ``node_id``.
        FleetError: the coordinator is unreachable or answered an error.
    """
    nodes = call(coordinator, "/api/v1/nodes")["nodes"]
    node = next((n for n in nodes if n["id"] == node_id), None)
    if node is None:
        known = ", ".join(sorted(n["id"] for n in nodes)) or "none"
        raise NotFound(f"no node named {node_id} (known: {known})")
    engines = [e for e in call(coordinator, "/api/v1/engines")["engines"] if e["node"] == node_id]
    gpus = [
        g | {"engines": sorted(e["id"] for e in engines if g["index"] in e.get("gpus", []))}
        for g in node.get("gpus", [])
    ]
    return {"node": node | {"gpus": gpus}, "engines": engines}


def _gpu_health(g: dict[str, Any]) -> Text:
    if g.get("healthy"):
        return Text("ok", style="green")
    return Text(g.get("reason") or "unhealthy", style="red")


def render_node(data: dict[str, Any], wide: bool) -> RenderableType:
    """``fleet node inspect``: a summary line, then its GPUs, engines, cached models and
    downloads (``wide``: also GPU UUIDs and power)."""
    n = data["node"]
    head = Text.assemble((f"node {n['id']}", "bold"), "  ", _node_state(n))
    if n.get("heartbeat_age_s") is not None:
        head.append(f"  heartbeat {age(n['heartbeat_age_s'])} ago")
    head.append(f"  agent {cell(n.get('agent_url'))}")
    if n.get("agent_version"):
        head.append(f" (v{n['agent_version']})")
    parts: list[RenderableType] = [head, Text("")]
    columns = ["gpu", "name", "memory", "util", "temp", "ecc", "xids", "health", "engines"]
    if wide:
        columns[2:2] = ["uuid"]
        columns[6:6] = ["power"]
    rows = []
    for g in n.get("gpus", []):
        memory = f"{size(g['memory_used_bytes'])} / {size(g['memory_total_bytes'])}"
        row: list[RenderableType] = [
            str(g["index"]) + (" (fake)" if g.get("fake") else ""), g["name"], memory,
            f"{g['utilization_pct']:.0f}%", f"{g['temperature_c']:.0f} °C",
            str(g.get("ecc_uncorrected", 0)), cell(g.get("xids")), _gpu_health(g),
            cell(g.get("engines")),
        ]  # fmt: skip
        if wide:
            row[2:2] = [g["uuid"]]
            row[6:6] = [f"{g['power_w']:.0f} W"]
        rows.append(row)
    parts.append(table(columns, rows) if rows else Text("no GPUs: CPU engines only"))
    parts += [Text(""), Text("engines", style="bold")]
    engine_rows = [
        [e["id"], e["model"], state(e["state"]), cell(e.get("gpus")), cell(e.get("pid")),
         str(e.get("restarts", 0)), cell(e.get("url"))]
        for e in data["engines"]
    ]  # fmt: skip
    parts.append(
        table(["id", "model", "state", "gpus", "pid", "restarts", "url"], engine_rows)
        if engine_rows
        else Text("none")
    )
    parts += [Text(""), Text("model cache", style="bold")]
    cache = [
        [m["uri"], size(m["size_bytes"]), state("cached"), "yes" if m["pinned"] else "no"]
        for m in n.get("models", [])
    ] + [
        [f["uri"], size(f["bytes_total"]), state("failed" if f["state"] == "failed" else
                                                  "fetching"), fetch_line(f)]
        for f in n.get("fetches", [])
    ]  # fmt: skip
    parts.append(
        table(["source", "size", "state", "in use / progress"], cache) if cache else Text("empty")
    )
    return Group(*parts)


def _node_inspect(args: argparse.Namespace) -> int:
    return cliout.show(args, lambda: fetch_node(args.coordinator, args.node), render_node)


# -- fleet gpus -------------------------------------------------------------------------------


def render_gpus(data: dict[str, Any], wide: bool) -> RenderableType:
    """``fleet gpus``' table (``wide``: also UUID, power, ECC, XIDs)."""
    columns = ["index", "name", "memory", "util", "temp", "health", "fake"]
    if wide:
        columns[2:2] = ["uuid"]
        columns[6:6] = ["power", "ecc", "xids"]
    rows = []
    for g in data["gpus"]:
        row: list[RenderableType] = [
            str(g["index"]), g["name"],
            f"{size(g['memory_used_bytes'])} / {size(g['memory_total_bytes'])}",
            f"{g['utilization_pct']:.0f}%", f"{g['temperature_c']:.0f} °C", _gpu_health(g),
            "yes" if g.get("fake") else "no",
        ]  # fmt: skip
        if wide:
            row[2:2] = [g["uuid"]]
            row[6:6] = [f"{g['power_w']:.0f} W", str(g["ecc_uncorrected"]), cell(g["xids"])]
        rows.append(row)
    notes: list[RenderableType] = [table(columns, rows)]
    if any(g.get("fake") for g in data["gpus"]):
        notes.append(Text("fake: a GPU from --fake-gpus, not NVML's; its engines run on CPU"))
    if not data["gpus"]:
        notes = [Text("no GPUs found through NVML: this node runs CPU engines only")]
    return Group(*notes)


def _gpus(args: argparse.Namespace) -> int:
    from fleet.agent.fakenvml import FakeNvml
    from fleet.agent.gpus import discover
    from fleet.clisettings import fake_gpus

    fake = fake_gpus(args)

    def fetch() -> dict[str, Any]:
        gpus = discover(FakeNvml(fake) if fake else None)
        return {"gpus": [g.__dict__ | {"xids": list(g.xids)} for g in gpus]}

    return cliout.show(args, fetch, render_gpus)


__all__ = [
    "add_parsers",
    "age",
    "fetch_node",
    "gpu_summary",
    "render_engines",
    "render_gpus",
    "render_node",
    "render_nodes",
]
