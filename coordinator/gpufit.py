"""GPU-memory placement: which GPUs each engine of each deployment runs on, and when to move one.

Sans-I/O and stateless: :func:`plan` takes what is wanted (:class:`Want`, one per deployment),
the live nodes and their GPUs (:class:`Node`; a lost node is simply absent) and the engines placed
so far (:class:`Engine`), and returns a :class:`Plan` of engines to start, engines to stop and
slots it could not place, with a reason for each. The caller applies it, records the started
engines and passes them back next time, so calling it again with nothing changed returns an empty
plan.

Rules (docs/DEPLOYMENTS.md has the full picture):

* Memory: an engine fits a GPU as :meth:`EngineMemory.fits` says (vLLM's own budget rules). A GPU's
  free memory is what its agent read, less the claim of every engine placed there that its agent
  does not report running yet (a running engine is already in the reading).
* Choice (:mod:`fleet.coordinator.gpuchoice`): real GPUs before fake ones; the deployment's
  preferred tiers in order; a tensor-parallel group on one node, else on the fewest nodes with
  equal GPU counts each; replicas of a deployment on the nodes with fewest of its engines; then
  the tightest fit, so large GPUs stay free for large models.
* Order: deployments by priority, highest first, then name; a deployment's moves before its new
  replicas.
* Moves, each with a cause and nothing else: the engine's node is gone (stopped now, placed
  anew); one of its GPUs is unhealthy or gone (only that engine moves); it restarted
  ``crash_loop_restarts`` times (it moves off its GPUs). Make-before-break: the new copy starts
  first and the old one's :class:`Stop` carries ``after`` = the new engine's id while the old is
  ready and the new is not, so a served name keeps a ready engine while capacity allows. An
  engine that cannot be moved for lack of room stays where it is (unless its node is gone).
* Removed deployments and replicas beyond the wanted count stop at once; a healthy engine is never
  moved to improve packing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fleet.protocol.errors import ConfigError

from .deployspec import FleetModel
from .gpuchoice import Capacity, GpuRef, Node, choose, no_fit_reason
from .gpumemory import EngineMemory, MemoryConfig, engine_memory
from .modelsize import ModelFootprint


@dataclass(frozen=True)
class Want:
    """What one deployment asks of the fleet.

    Attributes:
        name: the deployment.
        slots: ``(slot id, role)`` per engine (:meth:`FleetModel.engine_slots`).
        tp: GPUs per engine.
        memory: the engine's memory on each of its GPUs.
        priority: higher places first.
        tiers: preferred GPU tiers, best first.
    """

    name: str
    slots: tuple[tuple[str, str], ...]
    tp: int
    memory: EngineMemory
    priority: int = 0
    tiers: tuple[str, ...] = ()

    @classmethod
    def of(
        cls,
        model: FleetModel,
        footprint: ModelFootprint,
        *,
        count: int | None = None,
        memory: MemoryConfig | None = None,
    ) -> Want:
        """What a deployment asks for.

        Args:
            model: the deployment.
            footprint: its model's sizes.
            count: the replica count the autoscaler chose (see :meth:`FleetModel.engine_slots`).
            memory: the memory model's constants.
        """
        tp = model.tensor_parallel_size
        return cls(
            name=model.name,
            slots=model.engine_slots(count),
            tp=tp,
            memory=engine_memory(footprint, model.engine, tp, memory),
            priority=model.effective_priority,
            tiers=model.gpu_tiers,
        )


@dataclass(frozen=True)
class Engine:
    """An engine placed earlier, and what its agent says of it.

    Attributes:
        engine_id: ``SLOT`` for the first engine of a slot, ``SLOT-gN`` for its N-th move.
        deployment: the deployment it belongs to.
        slot: the slot it fills.
        role: ``both``, ``prefill`` or ``decode``.
        gpus: its GPUs in rank order.
        claims: bytes it holds on each of those GPUs.
        generation: N of ``SLOT-gN`` (0 for the first).
        running: its agent reports it (so its memory is in the GPU readings).
        ready: it answers and may take traffic.
        restarts: crashes the caller counted in its crash-loop window.
    """

    engine_id: str
    deployment: str
    slot: str
    role: str
    gpus: tuple[GpuRef, ...]
    claims: tuple[int, ...]
    generation: int = 0
    running: bool = False
    ready: bool = False
    restarts: int = 0

    @property
    def nodes(self) -> tuple[str, ...]:
        """The nodes of its group, rank 0's first."""
        return tuple(dict.fromkeys(g.node for g in self.gpus))


@dataclass(frozen=True)
class Start:
    """Start ``engine``; ``replaces`` is the engine it moves (None for a new replica)."""

    engine: Engine
    reason: str
    replaces: str | None = None
    fake: bool = False


@dataclass(frozen=True)
class Stop:
    """Stop ``engine_id``: now when ``after`` is None, else once engine ``after`` is ready."""

    engine_id: str
    reason: str
    after: str | None = None


@dataclass(frozen=True)
class Blocked:
    """A slot with no (healthy) engine that could not be placed, and exactly why."""

    deployment: str
    slot: str
    reason: str


@dataclass(frozen=True)
class Plan:
    """What to do now."""

    starts: tuple[Start, ...] = ()
    stops: tuple[Stop, ...] = ()
    blocked: tuple[Blocked, ...] = ()


@dataclass(frozen=True)
class FitConfig:
    """Placement settings.

    Args:
        crash_loop_restarts: an engine that restarted this many times in the caller's window is
            moved off its GPUs.

    Raises:
        ConfigError: a value out of range (names the key).
    """

    crash_loop_restarts: int = 5

    def __post_init__(self) -> None:
        if self.crash_loop_restarts < 1:
            raise ConfigError("crash_loop_restarts", self.crash_loop_restarts, "must be >= 1")


def _cause(engine: Engine, nodes: dict[str, Node], cfg: FitConfig) -> tuple[str, bool]:
    """Why the engine must move ("" when it need not), and whether it is gone already."""
    for ref in engine.gpus:
        if ref.node not in nodes:
            return f"node {ref.node} lost", True
    for ref in engine.gpus:
        gpu = nodes[ref.node].gpu(ref.index)
        if gpu is None:
            return f"GPU {ref} gone", False
        if not gpu.healthy:
            return f"GPU {ref} unhealthy" + (f": {gpu.reason}" if gpu.reason else ""), False
    if engine.restarts >= cfg.crash_loop_restarts:
        return (
            f"crash-looping: {engine.restarts} restarts (limit {cfg.crash_loop_restarts})",
            False,
        )
    return "", False


def plan(
    wants: Sequence[Want],
    nodes: Sequence[Node],
    engines: Sequence[Engine],
    cfg: FitConfig | None = None,
) -> Plan:
    """Decide what to start and stop.

    Args:
        wants: every deployment (a deployment not listed has all its engines stopped).
        nodes: the live nodes.
        engines: every engine placed so far and not yet stopped.
        cfg: settings.

    Returns:
        The plan; empty when everything wanted runs where it may.
    """
    cfg = cfg or FitConfig()
    by_node = {n.name: n for n in nodes}
    capacity = Capacity(nodes, engines)
    want_by_name = {w.name: w for w in wants}
    starts: list[Start] = []
    stops: list[Stop] = []
    blocked: list[Blocked] = []
    # slot -> its engines; engines of removed deployments or slots stop now.
    by_slot: dict[tuple[str, str], list[Engine]] = {}
    for e in sorted(engines, key=lambda e: (e.deployment, e.slot, e.generation)):
        want = want_by_name.get(e.deployment)
        if want is None:
            stops.append(Stop(e.engine_id, f"deployment {e.deployment} removed"))
        elif e.slot not in {s for s, _ in want.slots}:
            stops.append(Stop(e.engine_id, f"deployment {e.deployment} scaled down"))
        else:
            by_slot.setdefault((e.deployment, e.slot), []).append(e)

    for want in sorted(wants, key=lambda w: (-w.priority, w.name)):
        placed = [e for (d, _), es in by_slot.items() if d == want.name for e in es]
        spread: dict[str, int] = {}
        moves: list[tuple[str, str, list[Engine], str]] = []  # slot, role, to replace, cause
        fresh: list[tuple[str, str]] = []
        for slot, role in want.slots:
            current = by_slot.get((want.name, slot), [])
            healthy: list[Engine] = []
            troubled: list[tuple[Engine, str]] = []
            for e in current:
                cause, gone = _cause(e, by_node, cfg)
                if gone:
                    stops.append(Stop(e.engine_id, cause))
                if cause:
                    troubled.append((e, cause))
                else:
                    healthy.append(e)
            if healthy:
                keep = max(healthy, key=lambda e: (e.ready, e.generation))
                for node in keep.nodes:
                    spread[node] = spread.get(node, 0) + 1
                wait = None if keep.ready else keep.engine_id
                for e, cause in troubled:
                    if by_node.keys() >= set(e.nodes):
                        stops.append(
                            Stop(e.engine_id, f"moved: {cause}", wait if e.ready else None)
                        )
                for e in healthy:
                    if e is not keep:
                        after = wait if e.ready else None
                        stops.append(Stop(e.engine_id, f"surplus copy of {slot}", after))
            elif troubled:
                moves.append((slot, role, [e for e, _ in troubled], troubled[-1][1]))
            else:
                fresh.append((slot, role))

        for slot, role, old, cause in moves + [(s, r, [], "") for s, r in fresh]:
            avoid = {g for e in old for g in e.gpus}
            found = choose(capacity, want.tp, want.memory, want.tiers, avoid, spread)
            live_old = [e for e in old if by_node.keys() >= set(e.nodes)]
            if found is None:
                reason = no_fit_reason(capacity, want.tp, want.memory, avoid)
                if old:
                    reason = f"cannot move {old[-1].engine_id} ({cause}): {reason}"
                blocked.append(Blocked(want.name, slot, reason))
                continue
            generation = 1 + max((e.generation for e in placed if e.slot == slot), default=-1)
            engine = Engine(
                engine_id=slot if generation == 0 else f"{slot}-g{generation}",
                deployment=want.name,
                slot=slot,
                role=role,
                gpus=found.gpus,
                claims=found.claims,
                generation=generation,
            )
            capacity.take(engine)
            for node in engine.nodes:
                spread[node] = spread.get(node, 0) + 1
            replaces = live_old[-1].engine_id if live_old else (old[-1].engine_id if old else None)
            starts.append(Start(engine, cause or "new replica", replaces, found.fake))
            for e in live_old:
                stops.append(
                    Stop(e.engine_id, f"moved: {cause}", engine.engine_id if e.ready else None)
                )
    return Plan(tuple(starts), tuple(stops), tuple(blocked))


__all__ = [
    "Blocked",
    "Engine",
    "FitConfig",
    "Plan",
    "Start",
    "Stop",
    "Want",
    "plan",
]
