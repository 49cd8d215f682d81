"""The fleet registry: which nodes exist, what they run, and which engines may take traffic.

Sans-I/O: fed by agent messages and ``now`` (seconds on any monotonic clock), it answers
questions synchronously. A node that has not been heard from for ``lost_after_s`` is marked lost
by :meth:`FleetRegistry.expire`, and its engines leave routing at once.

The engine views are built once per change (a Register, a Heartbeat, a node lost or forgotten)
and kept until the next: every request asks for them, several times.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from fleet.protocol.messages import (
    CachedModelInfo,
    EngineStatus,
    FetchInfo,
    GpuInfo,
    Heartbeat,
    Register,
)

from .gpuchoice import gpu_tier


@dataclass(frozen=True)
class EngineView:
    """An engine as the coordinator sees it (what ``fleet engines`` prints)."""

    id: str
    node: str
    model: str
    url: str
    pid: int
    state: str
    role: str
    kind: str
    restarts: int
    block_size: int
    gpus: tuple[int, ...]
    routable: bool
    tier: str = ""  # its GPUs' tier (gpuchoice.gpu_tier; "a+b" if mixed); "" without GPUs

    def as_json(self) -> dict[str, object]:
        """Return the JSON shape of ``fleet engines -o json``."""
        return {
            "id": self.id,
            "node": self.node,
            "model": self.model,
            "url": self.url,
            "pid": self.pid,
            "state": self.state,
            "role": self.role,
            "kind": self.kind,
            "restarts": self.restarts,
            "block_size": self.block_size,
            "gpus": list(self.gpus),
            "routable": self.routable,
            "tier": self.tier,
        }


@dataclass
class NodeRecord:
    """One node's last known state."""

    node_id: str
    agent_url: str
    agent_version: str
    registered_at: float
    last_seen: float
    gpus: tuple[GpuInfo, ...] = ()
    engines: dict[str, EngineStatus] = field(default_factory=dict)
    healthy: bool = True
    lost: bool = False
    models: tuple[CachedModelInfo, ...] = ()  # the node's model store, as last reported
    fetches: tuple[FetchInfo, ...] = ()

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.node_id,
            "agent_url": self.agent_url,
            "agent_version": self.agent_version,
            "healthy": self.healthy,
            "lost": self.lost,
            "gpus": [
                {
                    "index": g.index,
                    "uuid": g.uuid,
                    "name": g.name,
                    "memory_total_bytes": g.memory_total_bytes,
                    "memory_used_bytes": g.memory_used_bytes,
                    "utilization_pct": g.utilization_pct,
                    "temperature_c": g.temperature_c,
                    "power_w": g.power_w,
                    "ecc_uncorrected": g.ecc_uncorrected,
                    "healthy": g.healthy,
                    "xids": list(g.xids),
                    "reason": g.reason,
                    "fake": g.fake,
                }
                for g in self.gpus
            ],
            "engines": sorted(self.engines),
            "models": [
                {"uri": m.uri, "size_bytes": m.size_bytes, "pinned": m.pinned} for m in self.models
            ],
            "fetches": [
                {
                    "uri": f.uri,
                    "state": f.state,
                    "bytes_done": f.bytes_done,
                    "bytes_total": f.bytes_total,
                    "rate_bps": f.rate_bps,
                    "eta_s": f.eta_s,
                    "error": f.error,
                }
                for f in self.fetches
            ],
        }


def on_healthy_gpus(node: NodeRecord, status: EngineStatus) -> bool:
    """Whether every GPU ``status`` runs on is one its node reports, healthy (True for a CPU
    engine)."""
    healthy = {g.index for g in node.gpus if g.healthy}
    return all(i in healthy for i in status.gpus)


class FleetRegistry:
    """Nodes and engines, fed by Register and Heartbeat messages.

    Args:
        lost_after_s: a node not heard from for this long is lost.
    """

    def __init__(self, *, lost_after_s: float) -> None:
        self.lost_after_s = lost_after_s
        self._nodes: dict[str, NodeRecord] = {}
        self._views: _Views | None = None  # built on first ask after a change

    # -- updates -----------------------------------------------------------------------------

    def register(self, msg: Register, now: float) -> NodeRecord:
        """Apply an agent's Register; a node that re-registers replaces its old record."""
        record = NodeRecord(
            node_id=msg.node_id,
            agent_url=msg.agent_url,
            agent_version=msg.agent_version,
            registered_at=now,
            last_seen=now,
            gpus=msg.gpus,
            engines={e.engine_id: e for e in msg.engines},
            models=msg.models,
            fetches=msg.fetches,
        )
        self._nodes[msg.node_id] = record
        self._views = None
        return record

    def heartbeat(self, msg: Heartbeat, now: float) -> bool:
        """Apply a Heartbeat. Returns False if the node is unknown (it must register first)."""
        record = self._nodes.get(msg.node_id)
        if record is None or record.lost:
            return False
        record.last_seen = now
        record.healthy = msg.healthy
        record.gpus = msg.gpus
        record.engines = {e.engine_id: e for e in msg.engines}
        record.models, record.fetches = msg.models, msg.fetches
        self._views = None
        return True

    def expire(self, now: float) -> list[str]:
        """Mark nodes not heard from in time as lost; return the newly lost node ids."""
        lost = []
        for record in self._nodes.values():
            if not record.lost and now - record.last_seen > self.lost_after_s:
                record.lost = True
                lost.append(record.node_id)
        if lost:
            self._views = None
        return lost

    def forget(self, node_id: str) -> None:
        """Remove a node entirely."""
        self._nodes.pop(node_id, None)
        self._views = None

    # -- queries -----------------------------------------------------------------------------

    def node(self, node_id: str) -> NodeRecord | None:
        return self._nodes.get(node_id)

    def nodes(self) -> list[NodeRecord]:
        return sorted(self._nodes.values(), key=lambda r: r.node_id)

    def live_nodes(self) -> list[NodeRecord]:
        return [r for r in self.nodes() if not r.lost]

    def engines(self) -> list[EngineView]:
        """Every engine reported by a known node, lost nodes included (marked unroutable)."""
        return list(self._built().all)

    def routable(self, model: str | None = None) -> list[EngineView]:
        """Engines that may take traffic now, optionally for one model: one view per engine id,
        the copy :meth:`engine` prefers when live nodes report two (an engine being moved)."""
        views = self._built()
        if model is None:
            return list(views.routable)
        found = views.by_model.get(model)
        if found is None:
            found = views.by_model[model] = tuple(e for e in views.routable if e.model == model)
        return list(found)

    def models(self) -> list[str]:
        """Models with at least one routable engine."""
        return sorted({e.model for e in self.routable()})

    def engine(self, engine_id: str) -> EngineView | None:
        """The engine as its live node reports it; a lost node's stale entry only when no live
        node reports it (an engine of a lost node is placed again under the same id).

        Where two live nodes report the id (a copy placed again elsewhere, the old one not
        stopped yet), the copy that is ready on healthy GPUs wins, then a ready one, then the
        lowest node id."""
        return self._built().by_id.get(engine_id)

    def _built(self) -> _Views:
        views = self._views
        if views is None:
            views = self._views = self._build()
        return views

    def _build(self) -> _Views:
        nodes = self.nodes()
        every = sorted(
            (self._view(record, status) for record in nodes for status in record.engines.values()),
            key=lambda e: (e.id, not e.routable),
        )
        by_id: dict[str, EngineView] = {}
        for engine_id in sorted({e.id for e in every}):
            view = self._pick(nodes, engine_id)
            if view is not None:
                by_id[engine_id] = view
        routable = tuple(v for v in by_id.values() if v.routable)
        return _Views(tuple(every), by_id, routable, {})

    def _pick(self, nodes: list[NodeRecord], engine_id: str) -> EngineView | None:
        """:meth:`engine`'s choice among ``nodes`` (sorted by id)."""
        live: list[tuple[NodeRecord, EngineStatus]] = []
        stale = None
        for record in nodes:
            status = record.engines.get(engine_id)
            if status is not None:
                if not record.lost:
                    live.append((record, status))
                else:
                    stale = stale or self._view(record, status)
        if not live:
            return stale
        best = min(
            live,
            key=lambda rs: (rs[1].state != "ready", not on_healthy_gpus(rs[0], rs[1])),
        )
        return self._view(*best)

    def duplicates(self) -> dict[str, list[str]]:
        """Engine ids that more than one live node reports (a node that was lost came back
        with engines placed again elsewhere meanwhile): id → those nodes, sorted."""
        where: dict[str, list[str]] = {}
        for record in self._nodes.values():
            if not record.lost:
                for engine_id in record.engines:
                    where.setdefault(engine_id, []).append(record.node_id)
        return {e: sorted(nodes) for e, nodes in where.items() if len(nodes) > 1}

    def engine_ids(self) -> Iterable[str]:
        for record in self._nodes.values():
            yield from record.engines

    def _group_complete(self, head: EngineStatus) -> bool:
        """True if every rank of ``head``'s group (``head`` is rank 0) is reported ready by a
        live node with ``head``'s rendezvous: a partial group never takes traffic."""
        ready = {
            s.node_rank
            for record in self._nodes.values()
            if not record.lost
            for s in record.engines.values()
            if s.group == head.engine_id
            and s.nnodes == head.nnodes
            and s.state == "ready"
            and (s.master_addr, s.master_port) == (head.master_addr, head.master_port)
        }
        return ready >= set(range(1, head.nnodes))

    def _view(self, record: NodeRecord, status: EngineStatus) -> EngineView:
        return EngineView(
            id=status.engine_id,
            node=record.node_id,
            model=status.model,
            url=status.url,
            pid=status.pid,
            state="lost" if record.lost else status.state,
            role=status.role,
            kind=status.kind,
            restarts=status.restarts,
            block_size=status.block_size,
            gpus=status.gpus,
            routable=not record.lost
            and status.state == "ready"
            and status.node_rank == 0
            and (status.nnodes == 1 or self._group_complete(status)),
            tier=engine_tier(record.gpus, status.gpus),
        )


@dataclass
class _Views:
    """The engine views of one registry state (:meth:`FleetRegistry._built`)."""

    all: tuple[EngineView, ...]  # every reported copy, sorted by id (routable copies first)
    by_id: dict[str, EngineView]  # the copy :meth:`FleetRegistry.engine` returns
    routable: tuple[EngineView, ...]  # by id
    by_model: dict[str, tuple[EngineView, ...]]  # routable ones of a model, filled on demand


def engine_tier(node_gpus: Iterable[GpuInfo], indices: Iterable[int]) -> str:
    """The tier of an engine's GPUs (``h100``; ``a100+h100`` when mixed; ``""`` for none)."""
    names = {g.index: g.name for g in node_gpus}
    return "+".join(sorted({gpu_tier(names[i]) for i in indices if i in names} - {""}))


__all__ = ["EngineView", "engine_tier", "FleetRegistry", "NodeRecord", "on_healthy_gpus"]
