"""``/admin/v1/prestage``: fetch a model onto nodes before any engine needs it.

``POST`` with ``{"deployment": NAME}`` or ``{"source": URI}`` and optionally
``"nodes": [ID, ...]`` (default: every live node) sends ``PrestageModel`` to each node's agent
and answers 202 with each node's status; ``GET`` lists every prestage asked for since the
coordinator started, with each node's status as its heartbeats tell it. The coordinator keeps
no download state of its own: the agents' stores are the truth, reported in every heartbeat
(``models``, ``fetches``).

A node's status for a source (:func:`node_status`, sans-I/O): ``cached`` (with its size),
``fetching`` (``listing`` or ``downloading``: bytes done of total, rate, ETA), ``failed`` (the
store's reason; prestage again to retry), ``requested`` (sent, not yet reported), ``lost``
(the node stopped answering) or ``unknown`` (not registered).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from fleet.protocol.messages import PrestageModel
from fleet.protocol.modelsource import ModelSource

from .errors import ApiError, InvalidRequest
from .registry import NodeRecord
from .validation import parse_json_object

if TYPE_CHECKING:
    from .deploybook import DeploymentBook
    from .link import AgentLink
    from .registry import FleetRegistry


class PrestagePorts(Protocol):
    """What pre-staging uses of the coordinator."""

    book: DeploymentBook
    registry: FleetRegistry
    link: AgentLink
    prestages: PrestageBook


class NotFound(ApiError):
    """An unknown deployment or node (404)."""

    status = 404


@dataclass(frozen=True)
class PrestageRequest:
    """One prestage asked for: a source, the deployment it came from (or ""), its nodes."""

    source: str
    deployment: str
    nodes: tuple[str, ...]
    requested_at: float  # epoch seconds


def parse_request(
    doc: dict[str, Any],
    *,
    deployment_source: Callable[[str], str | None],
    live_nodes: Iterable[str],
    now: float,
) -> PrestageRequest:
    """Validate a ``POST /admin/v1/prestage`` body.

    Args:
        doc: the JSON body.
        deployment_source: a deployment's source URI by name, None if there is none.
        live_nodes: the nodes that answer now (the default target, and the only valid ones).
        now: epoch seconds.

    Raises:
        InvalidRequest: neither or both of ``deployment``/``source``, a field of the wrong
            type, a source that is not a remote URI ("nothing to fetch"), no live node.
        NotFound: an unknown deployment or node.
    """
    unknown = sorted(set(doc) - {"deployment", "source", "nodes"})
    if unknown:
        raise InvalidRequest(f"Unknown field `{unknown[0]}`.", param=unknown[0])
    if ("deployment" in doc) == ("source" in doc):
        raise InvalidRequest("Give one of `deployment` or `source`.", param="deployment")
    field = "deployment" if "deployment" in doc else "source"
    value = doc[field]
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"`{field}` must be a non-empty string.", param=field)
    deployment = ""
    if field == "deployment":
        deployment = value
        found = deployment_source(value)
        if found is None:
            raise NotFound(f"No deployment named `{value}`.", param="deployment", code="not_found")
        uri = found
    else:
        uri = value
    try:
        scheme = ModelSource.parse(uri).scheme
    except ValueError as exc:
        raise InvalidRequest(f"`source` is not a model source: {exc}", param=field) from exc
    if scheme in ("path", "file"):
        raise InvalidRequest(
            f"`{uri}` is a local path: nothing to fetch (engines read it in place).",
            param=field,
            code="nothing_to_fetch",
        )
    live = sorted(set(live_nodes))
    nodes = doc.get("nodes")
    if nodes is None:
        if not live:
            raise InvalidRequest("No live node to prestage on.", param="nodes", code="no_nodes")
        return PrestageRequest(uri, deployment, tuple(live), now)
    if not isinstance(nodes, list) or not nodes or not all(isinstance(n, str) for n in nodes):
        raise InvalidRequest("`nodes` must be a non-empty list of node ids.", param="nodes")
    for node in nodes:
        if node not in live:
            raise NotFound(f"No live node `{node}`.", param="nodes", code="node_not_found")
    return PrestageRequest(uri, deployment, tuple(dict.fromkeys(nodes)), now)


def node_status(node_id: str, record: NodeRecord | None, uri: str) -> dict[str, Any]:
    """What ``node_id`` last reported about ``uri`` (see the module docstring)."""
    out: dict[str, Any] = {"node": node_id}
    if record is None:
        return out | {"state": "unknown"}
    if record.lost:
        return out | {"state": "lost"}
    for model in record.models:
        if model.uri == uri:
            return out | {"state": "cached", "sizeBytes": model.size_bytes, "pinned": model.pinned}
    for fetch in record.fetches:
        if fetch.uri == uri:
            if fetch.state == "failed":
                return out | {"state": "failed", "error": fetch.error}
            return out | {
                "state": "fetching",
                "phase": fetch.state,
                "bytesDone": fetch.bytes_done,
                "bytesTotal": fetch.bytes_total,
                "rateBps": round(fetch.rate_bps, 1),
                "etaS": None if fetch.eta_s is None else round(fetch.eta_s, 1),
            }
    return out | {"state": "requested"}


class PrestageBook:
    """The prestages asked for, newest request per source (nodes accumulate)."""

    def __init__(self) -> None:
        self._requests: dict[str, PrestageRequest] = {}

    def add(self, req: PrestageRequest) -> None:
        old = self._requests.pop(req.source, None)
        if old is not None:
            nodes = tuple(dict.fromkeys(old.nodes + req.nodes))
            req = PrestageRequest(req.source, req.deployment or old.deployment, nodes,
                                  req.requested_at)  # fmt: skip
        self._requests[req.source] = req

    def requests(self) -> list[PrestageRequest]:
        return list(self._requests.values())

    def sources_for(self, node_id: str) -> list[str]:
        """The sources prestaged on ``node_id``, to send again when it registers: an agent
        that restarted lost its downloads in progress (its store skips what it holds)."""
        return [r.source for r in self._requests.values() if node_id in r.nodes]


def _entry(coord: PrestagePorts, req: PrestageRequest) -> dict[str, Any]:
    return {
        "source": req.source,
        "deployment": req.deployment,
        "requestedAt": req.requested_at,
        "nodes": [node_status(n, coord.registry.node(n), req.source) for n in req.nodes],
    }


def post(coord: PrestagePorts, raw: bytes) -> tuple[dict[str, Any], int]:
    """``POST /admin/v1/prestage``: the request's per-node status and 202.

    Raises:
        InvalidRequest, NotFound: see :func:`parse_request`.
    """

    def source_of(name: str) -> str | None:
        held = coord.book.get(name)
        return held[1].source.uri if held is not None else None

    req = parse_request(
        parse_json_object(raw),
        deployment_source=source_of,
        live_nodes=(r.node_id for r in coord.registry.live_nodes()),
        now=time.time(),
    )
    coord.prestages.add(req)
    sent = {n: coord.link.send(n, PrestageModel(req.source)) for n in req.nodes}
    out = _entry(coord, req)
    for node in out["nodes"]:
        if not sent[node["node"]]:
            node["state"], node["error"] = "failed", "the coordinator could not reach the agent"
    return out, 202


def listing(coord: PrestagePorts) -> dict[str, Any]:
    """``GET /admin/v1/prestage``."""
    return {"prestages": [_entry(coord, r) for r in coord.prestages.requests()]}


__all__ = [
    "PrestagePorts",
    "NotFound",
    "PrestageBook",
    "PrestageRequest",
    "listing",
    "node_status",
    "parse_request",
    "post",
]
