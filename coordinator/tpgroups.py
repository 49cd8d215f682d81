"""Tensor-parallel groups: place each group's ranks, watch them, tear a broken group down.

Sans-I/O. :meth:`TPGroups.reconcile` takes the deployments, the registry and ``now`` and returns
the messages to send. A deployment with ``tensor_parallel_size`` above 1 has engines that are
groups (``NAME-i``, the group's routable id, which is rank 0's engine id; rank ``r`` runs as
``NAME-i.rankR``). The life of a group:

1. **Placed.** One node with ``tp`` ranks' GPUs (``pack``: one process, an ordinary engine with
   ``--tensor-parallel-size``), or one rank per node on ``tp`` distinct nodes (``spread``).
   ``auto`` packs GPU groups when one node has the GPUs and spreads otherwise; CPU groups always
   spread (a node's cores are its capacity). Rank 0 is assigned first, with no master port.
2. **Rendezvous.** Rank 0's agent picks a free master port and reports it with rank 0's status;
   then the other ranks are assigned with rank 0's address and port.
3. **Serving.** The registry routes to the group only when rank 0 is ready and every other rank
   reports ready with the same rendezvous (:meth:`~.registry.FleetRegistry.routable`).
4. **Torn down** when any rank fails, stops, vanishes from its node, or its node is lost, or
   one of its GPUs turns unhealthy (NVML XID/ECC) or is gone, or a rank reports another
   rendezvous: every rank is unassigned (rank 0 outlives a dead peer while
   answering 503, so it is never trusted alone), and once no live node reports any of them the
   group is placed again, with a fresh master port, on healthy GPUs. A group is torn down before
   it is placed again (break-before-make): its ranks' engine ids are unique on their nodes.

A coordinator that restarts adopts a complete group its nodes report, and tears down a partial
one.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from fleet.protocol.messages import AssignEngine, EngineSpec, EngineStatus, UnassignEngine

from .deployment import Deployment, rank_engine_id
from .registry import FleetRegistry, NodeRecord

log = logging.getLogger(__name__)

_DEAD_STATES = ("failed", "stopped", "backoff", "stopping")


@dataclass(frozen=True)
class Send:
    """One message to one node's agent."""

    node_id: str
    message: AssignEngine | UnassignEngine


@dataclass(frozen=True)
class Group:
    """A group as placed: its ranks' nodes and specs (rank 0 first; the other ranks' specs
    exist once rank 0 reported its rendezvous).

    ``since`` is when its last assignment (or teardown) was sent; ``seen`` the ranks reported
    at least once; ``reason`` why it is being torn down ("" while it is not)."""

    group_id: str
    nodes: tuple[str, ...]
    specs: tuple[EngineSpec, ...]
    since: float
    rank_gpus: tuple[tuple[int, ...], ...] = ()  # each rank's GPUs on its node
    seen: frozenset[int] = frozenset()
    reason: str = ""

    @property
    def nnodes(self) -> int:
        return len(self.nodes)


class TPGroups:
    """Places and watches tensor-parallel groups (see the module docstring).

    Args:
        assign_timeout_s: resend an assignment (or teardown) not reflected after this long.
    """

    def __init__(self, *, assign_timeout_s: float) -> None:
        self.assign_timeout_s = assign_timeout_s
        self._groups: dict[str, Group] = {}
        self.teardowns = 0  # groups torn down since start (for tests and status)

    def group(self, group_id: str) -> Group | None:
        return self._groups.get(group_id)

    def held_gpus(self) -> dict[str, set[int]]:
        """Node id -> the GPUs placed groups hold there (reported by their nodes or not)."""
        out: dict[str, set[int]] = {}
        for g in self._groups.values():
            for node_id, gpus in zip(g.nodes, g.rank_gpus, strict=False):
                out.setdefault(node_id, set()).update(gpus)
        return out

    def reconcile(
        self,
        deployments: tuple[Deployment, ...],
        registry: FleetRegistry,
        now: float,
        *,
        settle_until: float = float("-inf"),
    ) -> list[Send]:
        """Return what to send now (nothing while settling)."""
        if now < settle_until:
            return []
        live = {n.node_id: n for n in registry.live_nodes()}
        wanted = {e: d for d in deployments if d.tensor_parallel_size > 1 for e in d.engine_ids()}
        for gone in set(self._groups) - set(wanted):
            del self._groups[gone]  # its ranks are unwanted now: the placer stops them
        out: list[Send] = []
        for group_id, deployment in wanted.items():
            out += self._one(group_id, deployment, live, now)
        return out

    # -- one group ---------------------------------------------------------------------------

    def _one(
        self, group_id: str, d: Deployment, live: dict[str, NodeRecord], now: float
    ) -> list[Send]:
        reported = _reported(group_id, d.tensor_parallel_size, live)
        g = self._groups.get(group_id)
        if g is None and reported:
            return self._adopt(group_id, reported, live, now)
        if g is not None and g.reason:
            if reported:
                if now - g.since < self.assign_timeout_s:
                    return []
                self._groups[group_id] = dataclasses.replace(g, since=now)
                return _unassign(group_id, reported)
            del self._groups[group_id]
            g = None
        if g is None:
            return self._place(group_id, d, live, now)
        reason = self._broken(g, reported, live)
        if reason:
            return self._tear_down(g, reason, reported, now)
        g = dataclasses.replace(g, seen=g.seen | frozenset(reported))
        self._groups[group_id] = g
        out: list[Send] = []
        if g.nnodes > 1 and len(g.specs) == 1 and 0 in reported:
            head = reported[0][1]
            if head.master_port:  # rank 0's rendezvous is known: the other ranks may start
                specs = [g.specs[0]] + [
                    dataclasses.replace(
                        g.specs[0],
                        engine_id=rank_engine_id(group_id, r),
                        node_rank=r,
                        master_addr=head.master_addr,
                        master_port=head.master_port,
                        gpus=g.rank_gpus[r] if r < len(g.rank_gpus) else (),
                    )
                    for r in range(1, g.nnodes)
                ]
                g = dataclasses.replace(g, specs=tuple(specs), since=now)
                self._groups[group_id] = g
                out += [Send(g.nodes[r], AssignEngine(specs[r])) for r in range(1, g.nnodes)]
                log.info("group %s: rank 0 at %s:%d, assigning ranks 1..%d",
                         group_id, head.master_addr, head.master_port, g.nnodes - 1)  # fmt: skip
                return out
        if now - g.since >= self.assign_timeout_s:  # resend what its node has not reported
            missing = [r for r in range(len(g.specs)) if r not in reported]
            if missing:
                self._groups[group_id] = dataclasses.replace(g, since=now)
                out += [Send(g.nodes[r], AssignEngine(g.specs[r])) for r in missing]
        return out

    def _broken(
        self, g: Group, reported: dict[int, tuple[str, EngineStatus]], live: dict[str, NodeRecord]
    ) -> str:
        """Why ``g`` must be torn down, or ""."""
        for r, node_id in enumerate(g.nodes):
            if node_id not in live:
                return f"rank {r}'s node {node_id} is lost"
            if not live[node_id].healthy:
                return f"rank {r}'s node {node_id} is unhealthy"
        for r, (node_id, status) in reported.items():
            if r >= len(g.specs) or node_id != g.nodes[r]:
                return f"rank {r} runs on node {node_id}, not where it was placed"
            trouble = _gpu_trouble(live[node_id], status)
            if trouble:
                return f"rank {r}'s GPU {node_id}:{trouble}"
            if status.state in _DEAD_STATES and (g.nnodes > 1 or status.state == "failed"):
                why = f": {status.last_error}" if status.last_error else ""
                return f"rank {r} on node {node_id} is {status.state}{why}"
        if g.nnodes > 1 and 0 in reported:
            head = reported[0][1]
            for r, (_, status) in reported.items():
                if r and (status.master_addr, status.master_port) != (
                    head.master_addr,
                    head.master_port,
                ):
                    return f"rank {r} joined another rendezvous than rank 0's"
        for r in g.seen - set(reported):
            return f"rank {r} is gone from node {g.nodes[r]}"
        return ""

    def _tear_down(
        self,
        g: Group,
        reason: str,
        reported: dict[int, tuple[str, EngineStatus]],
        now: float,
    ) -> list[Send]:
        log.warning("group %s torn down: %s", g.group_id, reason)
        self.teardowns += 1
        self._groups[g.group_id] = dataclasses.replace(g, reason=reason, since=now)
        out = _unassign(g.group_id, reported)
        told = {
            (s.node_id, s.message.engine_id) for s in out if isinstance(s.message, UnassignEngine)
        }
        for r, node_id in enumerate(g.nodes[: len(g.specs)]):  # assigned, maybe not reported yet
            engine_id = rank_engine_id(g.group_id, r)
            if (node_id, engine_id) not in told:
                out.append(Send(node_id, UnassignEngine(engine_id)))
        return out

    def _adopt(
        self,
        group_id: str,
        reported: dict[int, tuple[str, EngineStatus]],
        live: dict[str, NodeRecord],
        now: float,
    ) -> list[Send]:
        """Nodes report ranks of a group this coordinator did not place (it restarted)."""
        head = reported.get(0)
        nnodes = head[1].nnodes if head is not None else 0
        if head is not None and set(reported) == set(range(nnodes)):
            nodes = tuple(reported[r][0] for r in range(nnodes))
            specs = tuple(_spec_of(group_id, r, reported[r][1]) for r in range(nnodes))
            g = Group(group_id, nodes, specs, since=now, seen=frozenset(reported))
            if not self._broken(g, reported, live):
                self._groups[group_id] = g
                log.info("group %s adopted on nodes %s", group_id, ", ".join(nodes))
                return []
        nodes = tuple(node_id for node_id, _ in reported.values())
        g = Group(group_id, nodes, (), since=now)
        return self._tear_down(
            g, "found partial or broken after a coordinator restart", reported, now
        )

    def _place(
        self, group_id: str, d: Deployment, live: dict[str, NodeRecord], now: float
    ) -> list[Send]:
        nodes = self._choose(d, live)
        if nodes is None:
            return []
        tp = d.tensor_parallel_size
        per_node = d.gpus_per_engine // len(nodes)
        rank_gpus = tuple(tuple(self._free_gpus(live[n])[:per_node]) for n in nodes)
        spec = dataclasses.replace(d.spec(group_id, rank_gpus[0]), tensor_parallel_size=tp)
        if len(nodes) > 1:
            spec = dataclasses.replace(spec, nnodes=len(nodes), group=group_id)
        self._groups[group_id] = Group(group_id, nodes, (spec,), since=now, rank_gpus=rank_gpus)
        log.info("group %s placed on %s", group_id, ", ".join(nodes))
        return [Send(nodes[0], AssignEngine(spec))]

    def _choose(self, d: Deployment, live: dict[str, NodeRecord]) -> tuple[str, ...] | None:
        """The nodes of a new group (one: packed), or None when it does not fit now."""
        tp = d.tensor_parallel_size
        per_rank = d.gpus_per_engine // tp
        load = {n: len(r.engines) for n, r in live.items()}
        for g in self._groups.values():
            for n in g.nodes[len(g.specs) :]:  # placed, not assigned yet
                if n in load:
                    load[n] += 1
        healthy = sorted((n for n, r in live.items() if r.healthy), key=lambda n: (load[n], n))
        pack = d.tp_layout == "pack" or (d.tp_layout == "auto" and per_rank > 0)
        if pack:
            for n in healthy:
                if len(self._free_gpus(live[n])) >= d.gpus_per_engine:
                    return (n,)
            if d.tp_layout == "pack":
                return None
        fits = [n for n in healthy if len(self._free_gpus(live[n])) >= per_rank]
        return tuple(fits[:tp]) if len(fits) >= tp else None

    def why_unplaced(self, d: Deployment, registry: FleetRegistry) -> str:
        """Why a group of ``d`` has no nodes (for status)."""
        tp = d.tensor_parallel_size
        healthy = [n for n in registry.live_nodes() if n.healthy]
        per_rank = d.gpus_per_engine // tp
        if per_rank:
            return (
                f"needs {d.gpus_per_engine} free GPUs on one node or {per_rank} on each of "
                f"{tp} nodes; {len(healthy)} healthy nodes"
            )
        return f"needs {tp} healthy nodes (one rank each); {len(healthy)} live"

    def _free_gpus(self, node: NodeRecord) -> list[int]:
        used = {g for e in node.engines.values() for g in e.gpus}
        for group in self._groups.values():
            for n, gpus in zip(group.nodes, group.rank_gpus, strict=False):
                if n == node.node_id:
                    used |= set(gpus)
        return [g.index for g in node.gpus if g.healthy and g.index not in used]


def _reported(
    group_id: str, tp: int, live: dict[str, NodeRecord]
) -> dict[int, tuple[str, EngineStatus]]:
    """The group's ranks live nodes report: rank -> (node id, status)."""
    out: dict[int, tuple[str, EngineStatus]] = {}
    for node_id, record in sorted(live.items()):
        for r in range(tp):
            status = record.engines.get(rank_engine_id(group_id, r))
            if status is not None and r not in out:
                out[r] = (node_id, status)
    return out


def _gpu_trouble(node: NodeRecord, status: EngineStatus) -> str:
    """``INDEX is unhealthy: REASON`` (or ``is gone``) for the first of the engine's GPUs its
    node no longer reports healthy; "" when all are."""
    for index in status.gpus:
        gpu = next((g for g in node.gpus if g.index == index), None)
        if gpu is None:
            return f"{index} is gone"
        if not gpu.healthy:
            return f"{index} is unhealthy" + (f": {gpu.reason}" if gpu.reason else "")
    return ""


def _unassign(group_id: str, reported: dict[int, tuple[str, EngineStatus]]) -> list[Send]:
    return [
        Send(node_id, UnassignEngine(rank_engine_id(group_id, r)))
        for r, (node_id, _) in sorted(reported.items())
    ]


def _spec_of(group_id: str, rank: int, status: EngineStatus) -> EngineSpec:
    """A stand-in spec for an adopted rank (resent only if its node stops reporting it, which
    tears the group down instead)."""
    return EngineSpec(
        engine_id=rank_engine_id(group_id, rank),
        model=status.model,
        model_path="",
        gpus=status.gpus,
        nnodes=status.nnodes,
        node_rank=rank,
        master_addr=status.master_addr,
        master_port=status.master_port,
        group=status.group,
    )


__all__ = ["Group", "Send", "TPGroups"]
