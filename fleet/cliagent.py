"""``fleet agent inspect``: one node agent, asked directly over its own HTTP API.

For when the coordinator is down or unreachable: the agent answers ``/healthz`` (its node id,
pid and the coordinator it follows), ``/api/v1/gpus``, ``/api/v1/engines`` and
``/api/v1/models`` itself. The agent's URL is ``--agent``, else ``$FLEET_AGENT``, else
``http://127.0.0.1:8081`` (``fleet agent``'s default ``--http-port``; ``fleet nodes`` lists
each agent's URL).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from rich.console import Group, RenderableType
from rich.text import Text

from fleet import cliout
from fleet.cliconn import DEFAULT_AGENT, call
from fleet.clicontexts import check_url
from fleet.cliinspect import render_node


def add_parser(agent_parser: argparse.ArgumentParser) -> None:
    """Add ``inspect`` below ``fleet agent`` (which, without it, runs an agent)."""
    agent_sub = agent_parser.add_subparsers(dest="agent_cmd", metavar="COMMAND")
    inspect = agent_sub.add_parser(
        "inspect", help="ask a node agent directly (for when the coordinator is down)"
    )
    inspect.add_argument(
        "--agent",
        default=None,
        metavar="URL",
        help=f"the agent's HTTP URL (default: $FLEET_AGENT, else {DEFAULT_AGENT})",
    )
    cliout.add_output_args(inspect)
    inspect.set_defaults(func=_inspect)


def fetch_agent(url: str) -> dict[str, Any]:
    """``agent inspect -o json``: ``health``, ``gpus``, ``engines``, ``models``, ``fetches``.

    Raises:
        FleetError: the agent is unreachable or answered an error.
    """

    def get(path: str) -> Any:
        return call(url, path, what="agent")

    store = get("/api/v1/models")
    return {
        "health": get("/healthz"),
        "gpus": get("/api/v1/gpus")["gpus"],
        "engines": get("/api/v1/engines")["engines"],
        "models": store["models"],
        "fetches": store["fetches"],
    }


def render_agent(data: dict[str, Any], wide: bool) -> RenderableType:
    """The agent's view in ``fleet node inspect``'s layout, under a line saying who answered."""
    health = data["health"]
    engines = [
        {"id": e["engine_id"], "model": e["model"], "state": e["state"], "gpus": e["gpus"],
         "pid": e["pid"], "restarts": e["restarts"], "url": e["url"]}
        for e in data["engines"]
    ]  # fmt: skip
    gpus = [
        g | {"engines": sorted(e["id"] for e in engines if g["index"] in e["gpus"])}
        for g in data["gpus"]
    ]
    node = {
        "id": health["node"],
        "healthy": all(g["healthy"] for g in gpus),
        "gpus": gpus,
        "models": data["models"],
        "fetches": data["fetches"],
        "agent_url": data.get("url"),
    }
    link = health.get("coordinator") or "no coordinator linked"
    head = Text(f"agent pid {health['pid']}; coordinator: {link}", style="dim")
    return Group(head, render_node({"node": node, "engines": engines}, wide))


def _inspect(args: argparse.Namespace) -> int:
    url = args.agent or os.environ.get("FLEET_AGENT") or DEFAULT_AGENT
    url = check_url(url, "--agent" if args.agent else "$FLEET_AGENT")
    return cliout.show(args, lambda: fetch_agent(url) | {"url": url}, render_agent)


__all__ = ["add_parser", "fetch_agent", "render_agent"]
