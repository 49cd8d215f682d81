"""The autoscalers of a fleet's deployments: which deployments scale, and their counts.

Sans-I/O. :meth:`Scaling.tick` samples the demand of every deployment declared with
``minReplicas``/``maxReplicas`` (fixed ``replicas`` and ``roles`` do not scale), asks its
:class:`~.autoscale.Autoscaler`, and returns the deployments whose count changed; the caller
places the new counts (:meth:`~.deploybook.DeploymentBook.deployments` takes them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .autoscale import AutoscaleConfig, Autoscaler, Decision
from .deployspec import FleetModel


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
        for model in models:
            if model.replicas is not None or model.roles is not None or model.max_replicas is None:
                continue
            seen.add(model.name)
            low, high = model.min_replicas or 0, model.max_replicas
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
        for gone in set(self._scalers) - seen:
            del self._scalers[gone]
            self.counts.pop(gone, None)
            self.decisions.pop(gone, None)
        return changed


__all__ = ["Scaling"]
