"""The autoscalers of a fleet's deployments: which deployments scale, and their counts.

Sans-I/O. :meth:`Scaling.tick` samples the demand of every deployment declared with
``minReplicas``/``maxReplicas`` (fixed ``replicas`` and ``roles`` do not scale), asks its
:class:`~.autoscale.Autoscaler`, and returns the deployments whose count changed; the caller
places the new counts (:meth:`~.deploybook.DeploymentBook.deployments` takes them). Only the
leader of several coordinators decides; the others :meth:`Scaling.follow` what the nodes run,
so that they route to every engine the leader placed.

The autoscaler counts in units (an engine holding ``target_per_engine`` requests). With GPU
prices, :func:`tier_slots` turns units into the cheapest mix of tiers (:mod:`.costmix`): an
engine on a tier of speed 3 is 3 units, so the engine count may be below the units.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping

from .autoscale import AutoscaleConfig, Autoscaler, Decision
from .costmix import TierOption, cheapest_mix, slot_tiers
from .deployspec import FleetModel
from .placement import Placer
from .registry import FleetRegistry

#: Given a deployment, the units its autoscaler wants and the tiers its slots had: the tier of
#: each engine slot, or None to run one engine per unit on any tier.
Mix = Callable[[FleetModel, int, tuple[str, ...]], tuple[str, ...] | None]


class Scaling:
    """One autoscaler per autoscaled deployment, and the counts they chose."""

    def __init__(self, cfg: AutoscaleConfig, max_speed: float = 1.0) -> None:
        self.cfg = cfg
        # Units per engine on the fastest tier: maxReplicas engines may be this many units each.
        self.max_speed = max(1.0, max_speed)
        self._scalers: dict[str, Autoscaler] = {}
        self.counts: dict[str, int] = {}  # deployment name -> engines it should run
        self.units: dict[str, int] = {}  # deployment name -> units the autoscaler wants
        self.slots: dict[str, tuple[str, ...]] = {}  # deployment name -> each slot's tier
        self.decisions: dict[str, Decision] = {}  # the latest, for status and metrics

    def tick(
        self,
        models: Iterable[FleetModel],
        demand: Callable[[FleetModel], float],
        now: float,
        mix: Mix | None = None,
    ) -> list[tuple[str, Decision]]:
        """Sample each autoscaled deployment's ``demand`` (requests in flight on its engines
        and waiting for it) and decide; the deployments whose count or tiers changed, with
        why. ``mix``: the tiers for a number of units (None: one engine per unit)."""
        changed: list[tuple[str, Decision]] = []
        seen: set[str] = set()
        for model, low, high in _autoscaled(models):
            seen.add(model.name)
            scaler = self._scalers.get(model.name)
            top = math.floor(high * self.max_speed) if mix is not None else high  # units
            if scaler is None or (scaler.min_replicas, scaler.max_replicas) != (low, top):
                scaler = Autoscaler(self.cfg, min_replicas=low, max_replicas=top, now=now)
                self._scalers[model.name] = scaler
            scaler.observe(now, demand(model))
            current = self.counts.get(model.name, len(model.engine_slots()))
            decision = scaler.decide(now, self.units.get(model.name, current))
            self.decisions[model.name] = decision
            self.units[model.name] = decision.replicas
            before = self.slots.get(model.name, ())
            tiers = None
            if mix is not None and decision.replicas:
                tiers = mix(model, decision.replicas, before[:current])
            count = max(low, len(tiers)) if tiers else decision.replicas
            tiers = tiers + tiers[-1:] * (count - len(tiers)) if tiers else ()
            self.counts[model.name] = count
            self.slots[model.name] = tiers
            if count != current or tiers[:count] != before[:count]:
                changed.append((model.name, decision))
        self._forget(seen)
        return changed

    def follow(
        self, models: Iterable[FleetModel], running: Callable[[FleetModel], int]
    ) -> list[str]:
        """Take each autoscaled deployment's count from what the nodes run (``running``: the
        engines reported or assigned for it) instead of deciding; the deployments whose count
        changed. Their autoscalers start afresh if this coordinator leads later."""
        changed: list[str] = []
        seen: set[str] = set()
        for model, low, high in _autoscaled(models):
            seen.add(model.name)
            count = max(low, min(high, running(model)))
            if count != self.counts.get(model.name, len(model.engine_slots())):
                changed.append(model.name)
            self.counts[model.name] = count
        self._scalers.clear()
        self.units.clear()
        self.slots.clear()
        self._forget(seen)
        return changed

    def bounds(self) -> dict[str, tuple[int, int]]:
        """Each deployment this coordinator's autoscalers decide for (the leader's):
        (minReplicas, maxReplicas) in the units of :attr:`decisions`."""
        return {name: (s.min_replicas, s.max_replicas) for name, s in self._scalers.items()}

    def _forget(self, keep: set[str]) -> None:
        for gone in (set(self._scalers) | set(self.counts)) - keep:
            self._scalers.pop(gone, None)
            self.counts.pop(gone, None)
            self.units.pop(gone, None)
            self.slots.pop(gone, None)
            self.decisions.pop(gone, None)


def _autoscaled(models: Iterable[FleetModel]) -> Iterator[tuple[FleetModel, int, int]]:
    """The deployments with minReplicas/maxReplicas, with those bounds."""
    for model in models:
        if model.replicas is None and model.roles is None and model.max_replicas is not None:
            yield model, model.min_replicas or 0, model.max_replicas


def demand(
    model: FleetModel,
    placer: Placer,
    inflight: Callable[[str], int],
    queued: Callable[[str], int],
) -> float:
    """A deployment's demand: requests in flight on its engines (``inflight`` by engine id),
    plus its share of the requests waiting for its served names (``queued`` by name; shared
    evenly by the deployments serving a name)."""
    deployment = next((d for d in placer.deployments if d.name == model.name), None)
    engines = deployment.owned_ids() if deployment is not None else []
    total = float(sum(inflight(e) for e in engines))
    for name in model.served_model_names:
        total += queued(name) / (len(placer.serving(name)) or 1)
    return total


def running(model: FleetModel, engine_ids: set[str]) -> int:
    """How many engines of an autoscaled deployment run, from the engine ids nodes report
    (``NAME-0`` .. ``NAME-(N-1)``: scaling down removes the highest)."""
    indexes = [i for i in range(model.max_replicas or 0) if f"{model.name}-{i}" in engine_ids]
    return max(indexes, default=-1) + 1


def tier_slots(
    model: FleetModel,
    units: int,
    before: tuple[str, ...],
    placer: Placer,
    registry: FleetRegistry,
    speeds: Mapping[str, float],
) -> tuple[str, ...] | None:
    """The tier of each engine slot of ``model`` for ``units``.

    The engines it has keep their tiers (those they run on or were assigned, else the slot's
    tier in ``before``): engines are not moved between tiers. Growing adds the cheapest mix
    (:func:`.costmix.cheapest_mix`) of what free GPUs fit; shrinking drops the last slots (the
    engines a scale-down stops) while the rest still reach ``units``. None without prices, for
    a deployment without GPUs or with its own ``gpuTier`` list, or when no tier has room (one
    engine per unit then, placed anywhere)."""
    deployment = next((d for d in placer.deployments if d.name == model.name), None)
    if not placer.prices or deployment is None or model.gpu_tiers:
        return None
    gpus = deployment.gpus_per_engine
    if not gpus or deployment.tensor_parallel_size > 1:
        return None
    actual = placer.engine_tiers(registry)
    have = [actual.get(f"{model.name}-{i}", tier) for i, tier in enumerate(before)]
    have = [t for t in have if t]  # a slot without a known tier is planned afresh

    def speed(tier: str) -> float:
        return speeds.get(tier, 1.0)

    got = sum(speed(t) for t in have)
    while have and got - speed(have[-1]) >= units:
        got -= speed(have.pop())
    if got >= units:
        return tuple(have)
    options = [
        TierOption(tier, speed(tier), placer.prices.get(tier, 0.0) * gpus, room)
        for tier, room in sorted(placer.tier_room(gpus, registry).items())
    ]
    top = (model.max_replicas or units) - len(have)
    extra = slot_tiers(cheapest_mix(math.ceil(units - got), options, top), options)
    return (*have, *extra) or None


__all__ = ["Mix", "Scaling", "demand", "running", "tier_slots"]
