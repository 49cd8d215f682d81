"""``fleet kv stats`` and ``fleet route explain``: the KV index and the scheduling pipeline.

``kv stats`` reads the coordinator's ``/api/v1/cache/state`` (the index: size, blocks and
events per engine, gap/resync/restart counters) and, for each engine, its agent's KV relay
counters from the agent's ``/metrics`` (gaps seen, replays asked, batches replayed, resyncs):
the agent repairs gaps before the coordinator sees them. An agent the CLI cannot reach (a
cluster through ``kubectl port-forward``) leaves those counters out, named in
``agentsUnreachable``. ``route explain`` posts to ``/api/v1/route/explain``.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Group, RenderableType
from rich.text import Text

from fleet import cliout
from fleet.cliconn import add_coordinator_args, call
from fleet.cliout import cell, table
from fleet.protocol.errors import FleetError

AGENT_TIMEOUT_S = 2.0
RELAY_COUNTERS = {
    "fleet_agent_kv_gaps": "gaps",
    "fleet_agent_kv_replays": "replays",
    "fleet_agent_kv_replayed_batches": "replayedBatches",
    "fleet_agent_kv_resyncs": "resyncs",
}


def add_parsers(sub: Any) -> None:
    """Add ``kv stats`` and ``route explain`` to the ``fleet`` subparsers."""
    kv = sub.add_parser("kv", help="the coordinator's KV index")
    kv_sub = kv.add_subparsers(dest="kv_cmd", required=True, metavar="COMMAND")
    stats = kv_sub.add_parser(
        "stats", help="index size, blocks and events per engine, gaps, replays, resyncs"
    )
    cliout.add_output_args(stats)
    add_coordinator_args(stats)
    stats.add_argument(
        "--no-agents",
        action="store_true",
        help="skip the agents' relay counters (replays): only the coordinator is asked",
    )
    stats.set_defaults(func=_kv_stats)

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
    cliout.add_output_args(explain, watch=False)
    add_coordinator_args(explain)
    explain.set_defaults(func=_route_explain)


# -- fleet kv stats ---------------------------------------------------------------------------


def relay_counters(metrics_text: str) -> dict[str, dict[str, float]]:
    """An agent's KV relay counters per engine, from its Prometheus ``/metrics`` text."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            name = RELAY_COUNTERS.get(sample.name.removesuffix("_total"))
            if name is not None and sample.name.endswith("_total") and "engine" in sample.labels:
                out.setdefault(sample.labels["engine"], {})[name] = sample.value
    return out


def fetch_kv_stats(coordinator: str, admin_key: str, *, agents: bool = True) -> dict[str, Any]:
    """``kv stats -o json``: the coordinator's ``/api/v1/cache/state`` plus ``relay`` (engine
    id to its agent's relay counters) and ``agentsUnreachable`` (node ids).

    Raises:
        FleetError: the coordinator is unreachable or answered an error.
    """
    import httpx

    state = call(coordinator, "/api/v1/cache/state", admin_key)
    relay: dict[str, dict[str, float]] = {}
    unreachable: list[str] = []
    if agents:
        for node in call(coordinator, "/api/v1/nodes")["nodes"]:
            if node.get("lost") or not node.get("agent_url"):
                continue
            try:
                response = httpx.get(node["agent_url"] + "/metrics", timeout=AGENT_TIMEOUT_S)
                response.raise_for_status()
            except httpx.HTTPError:
                unreachable.append(node["id"])
                continue
            counters = relay_counters(response.text)
            for engine_id in node.get("engines", []):  # a counter never bumped is absent: 0
                relay[engine_id] = dict.fromkeys(RELAY_COUNTERS.values(), 0.0)
                relay[engine_id] |= counters.get(engine_id, {})
    out: dict[str, Any] = state | {"relay": relay, "agentsUnreachable": unreachable}
    return out


def render_kv_stats(data: dict[str, Any], wide: bool) -> RenderableType:
    """``fleet kv stats``: the index's size and counters, then one row per engine (``wide``:
    also batches and the relay's replayed batches)."""
    stats = data.get("stats", {})
    relay = data.get("relay", {})
    replays = sum(r.get("replays", 0) for r in relay.values())
    head = Text.assemble(
        ("KV index ", "bold"),
        f"{data['blocks']} blocks, {data['entries']}/{data['max_entries']} entries, "
        f"{len(data['engines'])} engines; events {stats.get('events', 0)}, "
        f"gaps {stats.get('gaps', 0)}, replays {replays:g}, resyncs {stats.get('resyncs', 0)}, "
        f"restarts {stats.get('restarts', 0)}, snapshots {stats.get('snapshots', 0)}",
    )
    columns = ["engine", "model", "blocks", "events", "relay gaps", "replays", "resyncs"]
    if wide:
        columns[4:4] = ["batches"]
        columns.append("replayed batches")
    rows = []
    for e in data["engines"]:
        r = relay.get(e["engine_id"])
        row = [e["engine_id"], e["model"], str(e["blocks"]), str(e["events"])]
        if wide:
            row.append(str(e["batches"]))
        row += [_count(r, "gaps"), _count(r, "replays"), _count(r, "resyncs")]
        if wide:
            row.append(_count(r, "replayedBatches"))
        rows.append(row)
    parts: list[RenderableType] = [head, table(columns, rows)]
    if data.get("agentsUnreachable"):
        nodes = ", ".join(data["agentsUnreachable"])
        parts.append(Text(f"relay counters missing: agents not reachable from here: {nodes}",
                          style="yellow"))  # fmt: skip
    return Group(*parts)


def _count(relay: dict[str, float] | None, key: str) -> str:
    return "-" if relay is None else f"{relay.get(key, 0):g}"


def _kv_stats(args: argparse.Namespace) -> int:
    return cliout.show(
        args,
        lambda: fetch_kv_stats(args.coordinator, args.admin_key, agents=not args.no_agents),
        render_kv_stats,
    )


# -- fleet route explain ----------------------------------------------------------------------


def explain_body(args: argparse.Namespace) -> dict[str, Any]:
    """The ``/api/v1/route/explain`` request of ``route explain``'s flags."""
    body: dict[str, Any] = {"model": args.model}
    if args.chat is not None:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        body["messages"] = [*messages, {"role": "user", "content": args.chat}]
    else:
        body["prompt"] = args.prompt
    if args.session:
        body["headers"] = {"x-session-id": args.session}
    return body


def render_explain(data: dict[str, Any], wide: bool) -> RenderableType:
    """``fleet route explain``: the profile, then each candidate's filters and scores."""
    parts: list[RenderableType] = [
        Text(
            f"profile {data['profile']}: {data['prompt_tokens']} prompt tokens "
            f"(tokenized in {data['tokenize_ms']} ms), scheduled in {data['scheduling_ms']} ms"
        ),
        _explain_table(data, data["candidates"]),
    ]
    if data.get("plugin_ms"):
        times = ", ".join(f"{name} {ms:.3f}" for name, ms in data["plugin_ms"].items())
        parts.insert(1, Text(f"per plugin (ms): {times}"))
    pd = data.get("pd")
    if pd:
        verdict = f"split, prefill on {data['prefill']}" if pd["split"] else "decode only"
        parts.append(Text(f"P/D ({pd['decider']}): {verdict}: {pd['reason']}"))
    if data.get("prefill_candidates"):
        parts.append(Text(f"prefill profile {data['prefill_profile']['name']}:"))
        parts.append(_explain_table(data["prefill_profile"], data["prefill_candidates"]))
    return Group(*parts)


def _explain_table(profile: dict[str, Any], candidates: list[dict[str, Any]]) -> RenderableType:
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
        shown = f"{prefix.get('tokens', 0)} ({prefix.get('blocks', 0)}/{prefix.get('of', 0)})"
        rows.append([c["engine"], *filters, shown if prefix else "—", *scores,
                     cell(c.get("total", "—")), "◀" if c.get("selected") else ""])  # fmt: skip
    return table(columns, rows)


def _route_explain(args: argparse.Namespace) -> int:
    body = explain_body(args)
    data = call(args.coordinator, "/api/v1/route/explain", args.admin_key, body, timeout_s=30)
    if not isinstance(data, dict) or "candidates" not in data:
        raise FleetError(f"{args.coordinator} answered route explain without candidates")
    return cliout.show(args, lambda: data, render_explain)


__all__ = [
    "add_parsers",
    "explain_body",
    "fetch_kv_stats",
    "relay_counters",
    "render_explain",
    "render_kv_stats",
]
