"""Placement: decide which node runs which engine.

Sans-I/O. :meth:`Placer.reconcile` compares the wanted engines (from the deployments) with what
the live nodes report and returns the assignments to send. An assignment stays pending until its
node reports the engine; one that is not reported within ``assign_timeout_s`` is sent again, and
engines of a lost node are placed anew on a live one.

Deployments are placed in the order given (higher priority first: :mod:`.deploybook`). An
engine without GPUs goes to the healthy node running the fewest engines. An engine with GPUs gets
healthy GPUs no other engine uses, on one node, chosen by :func:`.gpuchoice.choose`: real GPUs
before fake ones, the deployment's preferred tiers in order, nodes with the fewest of its engines,
then the tightest memory fit (large GPUs stay free for large models).

Moves, make-before-break. An engine whose every copy runs on a GPU its node reports unhealthy
(an XID or ECC error, a lost GPU) gets a second copy, under the same id, on another node's
healthy GPUs; the old copy keeps serving. Once two live nodes report the id, :meth:`surplus`
stops the copies not kept (the one placed last, on healthy GPUs) only when the kept copy is
ready, so a served name keeps a ready engine while capacity allows. Engine ids are unique on a
node, so a move onto a free healthy GPU of the same node cannot overlap: only when no other node
has room does :meth:`relocate` stop the old copy, and :meth:`reconcile` places it again there.
A copy on healthy GPUs is never moved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fleet.protocol.errors import ConfigError
from fleet.protocol.messages import AssignEngine, EngineSpec, GpuInfo

from .crashloop import CrashLoops
from .deployment import Deployment, rank_engine_id
from .gpuchoice import Capacity, Node, choose, gpu_tier, no_fit_reason
from .gpumemory import EngineMemory
from .registry import FleetRegistry, NodeRecord, on_healthy_gpus
from .shortfall import GpuShortfall, engine_shortfall, group_shortfall
from .tpgroups import TPGroups

#: The memory of an engine whose needs are unknown: any free GPU fits it.
ANY_MEMORY = EngineMemory(0, 0, 0, 0, 0, utilization=0.0)


@dataclass(frozen=True)
class Placement:
    """One decision: send ``assign`` to ``node_id``."""

    node_id: str
    assign: AssignEngine


class Placer:
    """Reconciles wanted engines with what nodes report.

    Args:
        deployments: what to serve.
        assign_timeout_s: resend an assignment its node has not reported after this long.
        settle_until: place nothing before this time. A (re)started coordinator first hears
            from every live node (each reports the engines it runs); placing at the first
            registration would start a second copy of engines whose node had not spoken yet,
            and put every new engine on the first node to register.
    """

    def __init__(
        self,
        deployments: tuple[Deployment, ...],
        *,
        assign_timeout_s: float,
        settle_until: float = -math.inf,
    ) -> None:
        self.assign_timeout_s = assign_timeout_s
        self.settle_until = settle_until
        # engine id -> (node id, spec, time sent)
        self._pending: dict[str, tuple[str, EngineSpec, float]] = {}
        self._placed: dict[str, str] = {}  # engine id -> the node this coordinator put it on
        self.deployments: tuple[Deployment, ...] = ()
        self._owner: dict[str, Deployment] = {}  # engine id -> its deployment
        self._serving: dict[str, tuple[Deployment, ...]] = {}  # served name -> deployments
        self.crash_loops = CrashLoops()  # engines moved off nodes they keep crashing on
        self.prices: dict[str, float] = {}  # dollars per GPU-hour by tier (costs.py)
        self.replace(deployments)

    def replace(self, deployments: tuple[Deployment, ...]) -> None:
        """Serve ``deployments`` from now on: engines no longer wanted are forgotten here and
        reported by :meth:`unwanted`; new and scaled-up ones are placed by :meth:`reconcile`.

        Raises:
            ConfigError: two deployments with one name.
        """
        names = [d.name for d in deployments]
        if len(set(names)) != len(names):
            raise ConfigError("name", names, "each deployment needs its own name")
        self.deployments = tuple(deployments)
        self._serving = {}
        self._owner = {e: d for d in self.deployments for e in d.owned_ids()}
        for engine_id in [e for e in self._pending if e not in self._owner]:
            del self._pending[engine_id]

    def deployment(self, model: str) -> Deployment | None:
        """The first deployment serving ``model`` (a served name)."""
        for d in self.deployments:
            if model in d.served_names:
                return d
        return None

    def serving(self, model: str) -> list[Deployment]:
        """Every deployment serving ``model`` (a served name), by name."""
        found = self._serving.get(model)
        if found is None:
            found = tuple(
                sorted((d for d in self.deployments if model in d.served_names), key=_name)
            )
            # Asked on every request: kept until the deployments change, but only for names
            # something serves (a client may send any name; those must not grow the cache).
            if found:
                self._serving[model] = found
        return list(found)

    def owner(self, engine_id: str) -> Deployment | None:
        """The deployment an engine id belongs to (None: no deployment wants it)."""
        return self._owner.get(engine_id)

    def pending(self) -> dict[str, tuple[str, float]]:
        """Engines assigned and not reported yet: engine id -> (node id, when sent)."""
        return {e: (node, sent) for e, (node, _, sent) in self._pending.items()}

    def why_unplaced(self, deployment: Deployment, registry: FleetRegistry, now: float) -> str:
        """Why an engine of ``deployment`` has no node (for status)."""
        if now < self.settle_until:
            return "waiting for every node to report what it runs before placing"
        live = registry.live_nodes()
        if not live:
            return "no live node"
        healthy = [n for n in live if n.healthy]
        if not healthy:
            return "no healthy node"
        need = deployment.gpus_per_engine
        if need and deployment.memory is not None:
            nodes = [Node.from_infos(n.node_id, self._unused(n)) for n in healthy]
            return no_fit_reason(Capacity(nodes, ()), need, deployment.memory)
        if need:
            best = max(healthy, key=lambda n: len(self._free_gpus(n, n.node_id)))
            free = len(self._free_gpus(best, best.node_id))
            if free < need:
                return (
                    f"needs {need} free GPU{'s' if need > 1 else ''} on one node; most: node "
                    f"{best.node_id} has {free}"
                )
        return "being placed"

    def gpu_shortfall(
        self, registry: FleetRegistry, now: float, groups: TPGroups | None = None
    ) -> list[GpuShortfall]:
        """Engines, and tensor-parallel groups of ``groups``, that no healthy live node has the
        free GPUs for now, in placement order (:mod:`.shortfall`): what more nodes would
        place. Not short: an engine some live node reports (running, crash-looping, on an
        unhealthy GPU), one assigned and not reported yet, a group ``groups`` placed. None
        while settling."""
        if now < self.settle_until:
            return []
        live = registry.live_nodes()
        held = groups.held_gpus() if groups is not None else {}
        free = {
            n.node_id: [g for g in self._unused(n) if g.index not in held.get(n.node_id, ())]
            for n in live
            if n.healthy
        }
        reported = {e for n in live for e in n.engines} | set(self._pending)
        out: list[GpuShortfall] = []
        for d in self.deployments:
            tp = d.tensor_parallel_size
            for engine_id in d.engine_ids() if d.gpus_per_engine else ():
                if tp == 1 and engine_id not in reported:
                    short = engine_shortfall(d, engine_id, d.memory or ANY_MEMORY, free)
                elif tp > 1 and groups is not None and groups.group(engine_id) is None:
                    ranks = {rank_engine_id(engine_id, r) for r in range(tp)}
                    short = None if ranks & reported else group_shortfall(d, engine_id, free)
                else:
                    continue
                if short is not None:
                    out.append(short)
        return out

    def unwanted(self, registry: FleetRegistry, now: float) -> list[tuple[str, str]]:
        """Engines live nodes run that no deployment wants (deleted, scaled down), as (node id,
        engine id); none while settling."""
        if now < self.settle_until:
            return []
        return [
            (node.node_id, engine_id)
            for node in registry.live_nodes()
            for engine_id in node.engines
            if engine_id not in self._owner
        ]

    def context_len(self, model: str) -> int | None:
        """The context length engines of ``model`` run with, if Fleet deploys it."""
        deployment = self.deployment(model)
        return deployment.max_model_len if deployment is not None else None

    def reconcile(self, registry: FleetRegistry, now: float) -> list[Placement]:
        """Return the assignments to send now (none while settling): engines no live node
        runs, and a second copy of engines whose every copy is on an unhealthy GPU."""
        if now < self.settle_until:
            return []
        live = {n.node_id: n for n in registry.live_nodes()}
        running: dict[str, str] = {}
        copies: dict[str, list[str]] = {}
        for node in live.values():
            for engine_id in node.engines:
                running[engine_id] = node.node_id
                copies.setdefault(engine_id, []).append(node.node_id)
        out: list[Placement] = []
        for deployment in self.deployments:
            if deployment.tensor_parallel_size > 1:
                continue  # tensor-parallel groups: placed by .tpgroups.TPGroups
            for engine_id in deployment.engine_ids():
                nodes = copies.get(engine_id, [])
                pending = self._pending.get(engine_id)
                if pending is not None and pending[0] in nodes:
                    del self._pending[engine_id]  # its node runs it now
                    pending = None
                if any(on_healthy_gpus(live[n], live[n].engines[engine_id]) for n in nodes):
                    self._pending.pop(engine_id, None)
                    continue
                if pending is not None:
                    node_id, spec, sent = pending
                    if node_id in live and now - sent < self.assign_timeout_s:
                        continue
                    if node_id in live:  # resend to the same node: it may have missed it
                        self._pending[engine_id] = (node_id, spec, now)
                        out.append(Placement(node_id, AssignEngine(spec)))
                        continue
                # Not running, or running on unhealthy GPUs only: a copy elsewhere, not where
                # it crash-looped lately unless nowhere else has room.
                avoid = self.crash_loops.avoided(engine_id, now)
                placed = self._choose(
                    deployment, engine_id, live, running, exclude=set(nodes) | avoid
                ) or self._choose(deployment, engine_id, live, running, exclude=set(nodes))
                if placed is None:
                    continue
                node_id, spec = placed
                self._pending[engine_id] = (node_id, spec, now)
                self._placed[engine_id] = node_id
                running[engine_id] = node_id
                out.append(Placement(node_id, AssignEngine(spec)))
        return out

    def surplus(self, registry: FleetRegistry) -> list[tuple[str, str]]:
        """Copies of an engine to stop, as (node id, engine id), where live nodes report one
        engine id twice: it was moved off an unhealthy GPU, or its node was lost, the engine
        placed again elsewhere, and the node came back.

        One copy is kept: the one this coordinator placed last if it runs on healthy GPUs, else
        the first (by node id) on healthy GPUs, else the one placed last, else the first. The
        others stop once the kept copy is ready; a copy that is not ready itself stops at once
        (it serves nothing), a ready one keeps serving until then (make-before-break)."""
        out: list[tuple[str, str]] = []
        for engine_id, nodes in registry.duplicates().items():
            status = {}
            for node_id in nodes:
                record = registry.node(node_id)
                assert record is not None  # duplicates() names known, live nodes only
                status[node_id] = (record, record.engines[engine_id])
            healthy = [n for n in nodes if on_healthy_gpus(*status[n])]
            placed = self._placed.get(engine_id)
            if placed in healthy:
                keep = placed
            elif healthy:
                keep = healthy[0]
            else:
                keep = placed if placed in nodes else nodes[0]
            keep_ready = status[keep][1].state == "ready"
            out.extend(
                (node_id, engine_id)
                for node_id in nodes
                if node_id != keep and (keep_ready or status[node_id][1].state != "ready")
            )
        return out

    def relocate(self, registry: FleetRegistry, now: float) -> list[tuple[str, str]]:
        """Engines to stop so they can be placed again on their own node, as (node id, engine
        id): the only copy runs on an unhealthy GPU, no other node has room for it, and its node
        has enough healthy GPUs (its own healthy ones included) once it stops. None while
        settling. :meth:`reconcile` places it again once its node stops reporting it."""
        if now < self.settle_until:
            return []
        live = {n.node_id: n for n in registry.live_nodes()}
        running = {e: n.node_id for n in live.values() for e in n.engines}
        copies: dict[str, list[str]] = {}
        for node in live.values():
            for engine_id in node.engines:
                copies.setdefault(engine_id, []).append(node.node_id)
        out: list[tuple[str, str]] = []
        for engine_id, nodes in copies.items():
            deployment = self._owner.get(engine_id)
            if deployment is None or len(nodes) != 1 or engine_id in self._pending:
                continue
            if deployment.tensor_parallel_size > 1:
                continue  # a group's ranks move with their group (tpgroups.py)
            node = live[nodes[0]]
            engine = node.engines[engine_id]
            if on_healthy_gpus(node, engine) or not node.healthy:
                continue
            if self._choose(deployment, engine_id, live, running, exclude={node.node_id}):
                continue  # reconcile moves it there, make-before-break
            own = {g.index for g in node.gpus if g.healthy} & set(engine.gpus)
            if len(self._free_gpus(node, node.node_id)) + len(own) >= deployment.gpus_per_engine:
                out.append((node.node_id, engine_id))
        return out

    def _choose(
        self,
        deployment: Deployment,
        engine_id: str,
        live: dict[str, NodeRecord],
        running: dict[str, str],
        *,
        exclude: set[str] | frozenset[str] = frozenset(),
    ) -> tuple[str, EngineSpec] | None:
        # Assignments sent earlier and not yet reported count too, or a node whose engines are
        # still pending looks empty and takes every re-placed engine.
        where = {e: n for e, (n, _, _) in self._pending.items()} | running
        candidates = [n for n in sorted(live) if live[n].healthy and n not in exclude]
        if not deployment.gpus_per_engine:
            load = {node_id: 0 for node_id in live}
            for node_id in where.values():
                if node_id in load:
                    load[node_id] += 1
            best = min(candidates, key=lambda n: (load[n], n), default=None)
            return None if best is None else (best, deployment.spec(engine_id, ()))
        mine = set(deployment.owned_ids())
        spread: dict[str, int] = {}
        for e, node_id in where.items():
            if e in mine and e != engine_id:
                spread[node_id] = spread.get(node_id, 0) + 1
        nodes = [Node.from_infos(n, self._unused(live[n])) for n in candidates]
        found = choose(
            Capacity(nodes, ()),
            deployment.gpus_per_engine,
            deployment.memory or ANY_MEMORY,
            deployment.tiers_for(engine_id),
            (),
            spread,
            node_counts=(1,),  # one engine process: its GPUs share a node
            prices=self.prices,
        )
        if found is None:
            return None
        return found.gpus[0].node, deployment.spec(engine_id, tuple(g.index for g in found.gpus))

    def tier_room(self, gpus_per_engine: int, registry: FleetRegistry) -> dict[str, int]:
        """New engines of ``gpus_per_engine`` GPUs (on one node) each tier's free GPUs fit."""
        room: dict[str, int] = {}
        if not gpus_per_engine:
            return room
        for node in registry.live_nodes():
            if not node.healthy:
                continue
            tiers = {g.index: gpu_tier(g.name) for g in node.gpus}
            free: dict[str, int] = {}
            for index in self._free_gpus(node, node.node_id):
                free[tiers[index]] = free.get(tiers[index], 0) + 1
            for tier, n in free.items():
                room[tier] = room.get(tier, 0) + n // gpus_per_engine
        return room

    def engine_tiers(self, registry: FleetRegistry) -> dict[str, str]:
        """The tier of the GPUs each engine of a live node runs on or was assigned."""
        out: dict[str, str] = {}
        for node in registry.live_nodes():
            tiers = {g.index: gpu_tier(g.name) for g in node.gpus}
            for engine_id, engine in node.engines.items():
                if engine.gpus:
                    out[engine_id] = tiers.get(engine.gpus[0], "")
            for engine_id, (node_id, spec, _) in self._pending.items():
                if node_id == node.node_id and spec.gpus and engine_id not in out:
                    out[engine_id] = tiers.get(spec.gpus[0], "")
        return out

    def _unused(self, node: NodeRecord) -> list[GpuInfo]:
        free = set(self._free_gpus(node, node.node_id))
        return [g for g in node.gpus if g.index in free]

    def _free_gpus(self, node: NodeRecord, node_id: str) -> list[int]:
        used = {g for e in node.engines.values() for g in e.gpus}
        used |= {g for n, spec, _ in self._pending.values() if n == node_id for g in spec.gpus}
        return [g.index for g in node.gpus if g.healthy and g.index not in used]


def _name(deployment: Deployment) -> str:
    return deployment.name


__all__ = ["ANY_MEMORY", "Placement", "Placer"]
