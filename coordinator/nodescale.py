"""How many nodes the fleet should have: the node scaler's decisions, sans-I/O.

When placement lacks GPUs, the leading coordinator asks for nodes by setting the replicas of a
scale target (a Cluster API MachineDeployment, or any resource with a ``/scale`` subresource
whose replicas are GPU nodes of ``gpus_per_node`` GPUs each); :mod:`.kubescale` does the I/O.
Every tick, :meth:`NodeScaler.decide` takes ``now``, the target's replicas, what placement
lacks GPUs for (:mod:`.shortfall`) and the idle nodes, and returns a :class:`Decision`:

* **up** at once when anything is short: by the nodes that fit the shortfall (first fit, largest
  first, each engine's GPUs on one node, a spread group's ranks on distinct nodes; ``ceil(GPUs
  / gpus_per_node)`` when engines divide nodes evenly), at most to ``max_nodes``. Then no more
  for ``cooldown_s``: the nodes asked for need that long to join, and asking again before would
  count the same shortfall twice. An engine larger than a node is reported, never asked for;
* **down** by one node when nothing is short and a node has run no engine for ``idle_s``, never
  below ``min_nodes``, and at most one node per ``cooldown_s`` (nor within ``cooldown_s`` of a
  scale-up): the node leaves before the next is judged;
* **up** to ``min_nodes`` at once when the target has fewer;
* else **hold**, with why.

The caller reports a decision it carried out (or, in dry run, would have) with
:meth:`NodeScaler.applied`; cool-downs count from then, so a failed write is retried next tick.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from fleet.protocol.errors import ConfigError

from .registry import FleetRegistry
from .shortfall import GpuShortfall


@dataclass(frozen=True)
class ScaleTarget:
    """A namespaced custom resource with a ``/scale`` subresource.

    Raises:
        ConfigError: an empty part.
    """

    group: str
    version: str
    plural: str
    namespace: str
    name: str

    def __post_init__(self) -> None:
        for key in ("group", "version", "plural", "namespace", "name"):
            if not getattr(self, key):
                raise ConfigError(f"node_scale_target.{key}", getattr(self, key), "is empty")

    @classmethod
    def parse(cls, text: str) -> ScaleTarget:
        """``GROUP/VERSION/PLURAL/NAMESPACE/NAME``, e.g.
        ``cluster.x-k8s.io/v1beta1/machinedeployments/default/gpu-pool``.

        Raises:
            ConfigError: not five non-empty parts.
        """
        parts = text.split("/")
        if len(parts) != 5 or not all(parts):
            raise ConfigError(
                "node_scale_target", text, "must be GROUP/VERSION/PLURAL/NAMESPACE/NAME"
            )
        return cls(*parts)

    def __str__(self) -> str:
        return f"{self.plural}.{self.group}/{self.version} {self.namespace}/{self.name}"


@dataclass(frozen=True)
class NodeScaleConfig:
    """The node scaler's settings.

    Raises:
        ConfigError: a value out of range (names the key).
    """

    target: ScaleTarget
    gpus_per_node: int
    max_nodes: int
    min_nodes: int = 0
    cooldown_s: float = 300.0  # after asking: wait this long for the nodes to join
    idle_s: float = 600.0  # a node running no engine this long may be given back
    interval_s: float = 10.0  # how often the target is read and a decision made
    dry_run: bool = False  # decide, log and count; never write the target

    def __post_init__(self) -> None:
        if self.gpus_per_node < 1:
            raise ConfigError("node_scale_gpus_per_node", self.gpus_per_node, "must be >= 1")
        if self.min_nodes < 0:
            raise ConfigError("node_scale_min", self.min_nodes, "must be >= 0")
        if self.max_nodes < max(1, self.min_nodes):
            raise ConfigError("node_scale_max", self.max_nodes, "must be >= 1 and >= the min")
        for key in ("cooldown_s", "idle_s"):
            if not getattr(self, key) >= 0:
                raise ConfigError(f"node_scale_{key}", getattr(self, key), "must be >= 0")
        if not self.interval_s > 0:
            raise ConfigError("node_scale_interval_s", self.interval_s, "must be > 0")


@dataclass(frozen=True)
class Decision:
    """The target's replicas now and wanted, and why, with the inputs they came from."""

    direction: str  # "up", "down" or "hold"
    current: int
    wanted: int
    reason: str
    short_gpus: int = 0  # GPUs of everything placement lacks them for
    short: tuple[str, ...] = ()  # those engines' (groups') ids
    idle: tuple[str, ...] = ()  # nodes idle for idle_s or more

    def __str__(self) -> str:
        nodes = "node" if self.wanted == 1 else "nodes"
        if self.direction == "hold":
            text = f"hold at {self.current} {nodes}: {self.reason}"
        else:
            text = f"{self.direction} {self.current} -> {self.wanted} {nodes}: {self.reason}"
        text += f" (short {self.short_gpus} GPUs"
        text += f": {', '.join(self.short)}" if self.short else ""
        return text + (f"; idle: {', '.join(self.idle)})" if self.idle else ")")


def nodes_for(short: Iterable[GpuShortfall], gpus_per_node: int) -> tuple[int, list[str]]:
    """New nodes of ``gpus_per_node`` GPUs that fit ``short`` (first fit, largest first; the
    parts of one engine's layout on distinct nodes), and the engines no such node fits."""
    bins: list[int] = []  # GPUs left on each new node
    too_big: list[str] = []
    for item in sorted(short, key=lambda s: (-s.gpus, s.engine_id)):
        layout = next((lay for lay in item.layouts if max(lay) <= gpus_per_node), None)
        if layout is None:
            too_big.append(item.engine_id)
            continue
        used: set[int] = set()
        for part in sorted(layout, reverse=True):
            i = next((i for i, left in enumerate(bins) if left >= part and i not in used), None)
            if i is None:
                bins.append(gpus_per_node)
                i = len(bins) - 1
            bins[i] -= part
            used.add(i)
    return len(bins), too_big


def idle_nodes(registry: FleetRegistry, busy: Iterable[str]) -> list[str]:
    """Live nodes with GPUs that run no engine and are not in ``busy`` (nodes with
    assignments not reported yet, or GPUs a tensor-parallel group holds)."""
    skip = set(busy)
    return [
        n.node_id
        for n in registry.live_nodes()
        if n.gpus and not n.engines and n.node_id not in skip
    ]


@dataclass
class NodeScaler:
    """Decides the scale target's replicas (see the module docstring)."""

    cfg: NodeScaleConfig
    _idle_since: dict[str, float] = field(default_factory=dict)
    _up_until: float = -math.inf  # no scale-up before (cool-down after one)
    _down_until: float = -math.inf  # no scale-down before

    def decide(
        self, now: float, *, replicas: int, short: Sequence[GpuShortfall], idle: Iterable[str]
    ) -> Decision:
        """The decision for now.

        Args:
            now: seconds on a monotonic clock.
            replicas: the target's spec replicas as just read.
            short: what placement lacks GPUs for (:meth:`.placement.Placer.gpu_shortfall`).
            idle: the nodes running no engine now (:func:`idle_nodes`).
        """
        cfg = self.cfg
        self._idle_since = {n: self._idle_since.get(n, now) for n in sorted(set(idle))}
        ripe = tuple(
            sorted(
                (n for n, t in self._idle_since.items() if now - t >= cfg.idle_s),
                key=lambda n: (self._idle_since[n], n),
            )
        )
        new_nodes, too_big = nodes_for(short, cfg.gpus_per_node)
        ids = tuple(s.engine_id for s in short)
        gpus = sum(s.gpus for s in short)

        def decision(direction: str, wanted: int, reason: str) -> Decision:
            return Decision(direction, replicas, wanted, reason, gpus, ids, ripe)

        if replicas < cfg.min_nodes:
            return decision("up", cfg.min_nodes, f"below the minimum of {cfg.min_nodes}")
        if new_nodes:
            plural = "s" if new_nodes > 1 else ""
            need = f"{new_nodes} more node{plural} of {cfg.gpus_per_node} GPUs"
            if now < self._up_until:
                left = self._up_until - now
                why = f"{need}; the nodes asked for last have {left:.0f} s more to join"
                return decision("hold", replicas, why)
            wanted = min(cfg.max_nodes, replicas + new_nodes)
            if wanted <= replicas:
                return decision("hold", replicas, f"{need}; at the maximum ({cfg.max_nodes})")
            return decision("up", wanted, f"placement lacks GPUs: {need}")
        if too_big:
            big = ", ".join(too_big)
            why = f"{big} need more GPUs than a node of the target has ({cfg.gpus_per_node})"
            return decision("hold", replicas, why)
        if not ripe:
            return decision("hold", replicas, f"no node idle for {cfg.idle_s:.0f} s")
        if replicas <= cfg.min_nodes:
            return decision("hold", replicas, f"idle nodes; at the minimum ({cfg.min_nodes})")
        if now < self._down_until:
            left = self._down_until - now
            return decision("hold", replicas, f"idle nodes; cool-down for {left:.0f} s more")
        idle_for = now - self._idle_since[ripe[0]]
        return decision("down", replicas - 1, f"node {ripe[0]} ran no engine for {idle_for:.0f} s")

    def applied(self, decision: Decision, now: float) -> None:
        """Record that ``decision`` was carried out (or reported, in dry run) at ``now``."""
        if decision.direction == "up":
            self._up_until = self._down_until = now + self.cfg.cooldown_s
        elif decision.direction == "down":
            self._down_until = now + self.cfg.cooldown_s
            for node_id in decision.idle[:1]:  # judged anew if it stays
                self._idle_since[node_id] = now


__all__ = [
    "Decision",
    "NodeScaleConfig",
    "NodeScaler",
    "ScaleTarget",
    "idle_nodes",
    "nodes_for",
]
