"""What placement lacks GPUs for: engines and tensor-parallel groups no live node can take.

Sans-I/O. :meth:`.placement.Placer.gpu_shortfall` walks the deployments in placement order
over the free GPUs of the healthy live nodes: each engine (or group) that fits takes its GPUs
from that pool, as placement would, and each that does not is a :class:`GpuShortfall`. The
node scaler (:mod:`.nodescale`) turns these into nodes to ask for.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleet.protocol.messages import GpuInfo

from .deployment import Deployment
from .gpuchoice import Capacity, Node, choose
from .gpumemory import EngineMemory

#: Node id -> its free healthy GPUs (as the agent last read them).
FreeGpus = dict[str, list[GpuInfo]]


@dataclass(frozen=True)
class GpuShortfall:
    """An engine (or tensor-parallel group) that no live node has the free GPUs for.

    Attributes:
        engine_id: the engine's id (a group's: rank 0's).
        deployment: its deployment's name.
        layouts: the ways its GPUs may be split over nodes, preferred first, each a tuple of
            GPUs per node: ``((4,),)`` four on one node; ``((4,), (2, 2))`` four on one node,
            or two on each of two nodes (a group with ``tpLayout: auto``).
    """

    engine_id: str
    deployment: str
    layouts: tuple[tuple[int, ...], ...]

    @property
    def gpus(self) -> int:
        """GPUs it needs in all."""
        return sum(self.layouts[0])


def engine_shortfall(
    d: Deployment, engine_id: str, memory: EngineMemory, free: FreeGpus
) -> GpuShortfall | None:
    """None if one node's free GPUs fit the engine (they are taken from ``free``), else what
    it lacks. The memory check is :func:`.gpuchoice.choose`'s, as placement's."""
    nodes = [Node.from_infos(n, gpus) for n, gpus in sorted(free.items())]
    found = choose(
        Capacity(nodes, ()), d.gpus_per_engine, memory, d.tiers, (), {}, node_counts=(1,)
    )
    if found is None:
        return GpuShortfall(engine_id, d.name, ((d.gpus_per_engine,),))
    for ref in found.gpus:
        free[ref.node] = [g for g in free[ref.node] if g.index != ref.index]
    return None


def group_shortfall(d: Deployment, group_id: str, free: FreeGpus) -> GpuShortfall | None:
    """None if free GPUs fit the group as :class:`.tpgroups.TPGroups` places it (packed on one
    node, or one rank on each of ``tp`` nodes; they are taken from ``free``), else what it
    lacks. A CPU group (no GPUs) never lacks any."""
    tp, total = d.tensor_parallel_size, d.gpus_per_engine
    per_rank = total // tp
    if not per_rank:
        return None
    layouts: list[tuple[int, ...]] = []
    if d.tp_layout in ("pack", "auto"):
        layouts.append((total,))
    if d.tp_layout in ("spread", "auto"):
        layouts.append((per_rank,) * tp)
    for layout in layouts:
        nodes = sorted((n for n, gpus in free.items() if len(gpus) >= layout[0]), key=str)
        if len(nodes) >= len(layout):
            for n in nodes[: len(layout)]:
                free[n] = free[n][layout[0] :]
            return None
    return GpuShortfall(group_id, d.name, tuple(layouts))


__all__ = ["FreeGpus", "GpuShortfall", "engine_shortfall", "group_shortfall"]
