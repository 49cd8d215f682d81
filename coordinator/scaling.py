"""The autoscalers of a fleet's deployments: which deployments scale, and their counts.

Sans-I/O. :meth:`Scaling.tick` samples the demand of every deployment declared with
``minReplicas``/``maxReplicas`` (fixed ``replicas`` and ``roles`` do not scale), asks its
:class:`~.autoscale.Autoscaler`, and returns the deployments whose count changed; the caller
places the new counts (:meth:`~.deploybook.DeploymentBook.deployments` takes them). Only the
leader of several coordinators decides; the others :meth:`Scaling.follow` what the nodes run,
so that they route to every engine the leader placed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from .autoscale import AutoscaleConfig, Autoscaler, Decision
from .deployspec import FleetModel
from .placement import Placer


class Scaling:
    """One autoscaler per autoscaled deployment, and the counts they chose."""

    def __init__(self, cfg: AutoscaleConfig) -> None:
        self.cfg = cfg
        self._scalers: dict[str, Autoscaler] = {}
        self.counts: dict[str, int] = {}  # deployment name -> engines it should run
        self.decisions: dict[str, Decision] = {}  # the latest, for status and metrics

    def tick(
        self, models: Iterable[FleetModel], demand: Callable[[FleetModel], float], now: float
    ) -> list[tuple[str, Decision]]:
        """Sample each autoscaled deployment's ``demand`` (requests in flight on its engines
        and waiting for it) and decide; the deployments whose count changed, with why."""
        changed: list[tuple[str, Decision]] = []
        seen: set[str] = set()
        for model, low, high in _autoscaled(models):
            seen.add(model.name)
            scaler = self._scalers.get(model.name)
            if scaler is None or (scaler.min_replicas, scaler.max_replicas) != (low, high):
                scaler = Autoscaler(self.cfg, min_replicas=low, max_replicas=high, now=now)
                self._scalers[model.name] = scaler
            scaler.observe(now, demand(model))
            current = self.counts.get(model.name, len(model.engine_slots()))
            decision = scaler.decide(now, current)
            self.decisions[model.name] = decision
            self.counts[model.name] = decision.replicas
            if decision.replicas != current:
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
        self._forget(seen)
        return changed

    def _forget(self, keep: set[str]) -> None:
        for gone in (set(self._scalers) | set(self.counts)) - keep:
            self._scalers.pop(gone, None)
            self.counts.pop(gone, None)
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


__all__ = ["Scaling", "demand", "running"]
