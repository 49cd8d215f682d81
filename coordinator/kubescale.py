"""Asking Kubernetes for GPU nodes: the I/O of :mod:`.nodescale`'s decisions.

:class:`ScaleApi` reads and patches the ``/scale`` subresource of the target (a Cluster API
MachineDeployment, say) through the official client's ``CustomObjectsApi``, in worker threads.
:class:`NodeScaling` is the loop: every ``interval_s``, on the leader only (a follower, or a
leader still settling, does nothing), it reads the target's replicas, asks the placer what it
lacks GPUs for and the registry which nodes are idle, lets :class:`~.nodescale.NodeScaler`
decide, logs the decision with its inputs, counts it, and patches ``spec.replicas`` (not in
dry run). An API error is logged and counted and the loop goes on; it never takes the
coordinator down. It runs until cancelled, and owns nothing that outlives it.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Protocol

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge

from .config import CoordinatorConfig
from .kubelease import api_client
from .leadership import Leadership
from .metrics import CoordinatorMetrics
from .nodescale import Decision, NodeScaleConfig, NodeScaler, ScaleTarget, idle_nodes
from .placement import Placer
from .registry import FleetRegistry
from .tpgroups import TPGroups

log = logging.getLogger(__name__)

#: One Kubernetes API call at a time for the node scaler.
KUBE_LIMITER = trio.CapacityLimiter(1)


class ScaleApi:
    """Read and write the replicas of one target's ``/scale`` through the ``kubernetes``
    client (synchronous: call it from a worker thread)."""

    def __init__(self, api_client: Any, target: ScaleTarget, *, timeout_s: float = 10.0) -> None:
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)
        self.target = target
        self.timeout_s = timeout_s

    def _where(self) -> tuple[str, str, str, str, str]:
        t = self.target
        return t.group, t.version, t.namespace, t.plural, t.name

    def read(self) -> int:
        """The target's ``spec.replicas``.

        Raises:
            kubernetes.client.ApiException: the API answered an error.
            ValueError: the answer is no Scale.
        """
        scale = self.api.get_namespaced_custom_object_scale(
            *self._where(), _request_timeout=self.timeout_s
        )
        return _replicas(scale)

    def write(self, replicas: int) -> int:
        """Set ``spec.replicas`` (a merge patch of the Scale); the replicas the API answers.

        Raises:
            kubernetes.client.ApiException: the API answered an error.
            ValueError: the answer is no Scale.
        """
        scale = self.api.patch_namespaced_custom_object_scale(
            *self._where(), {"spec": {"replicas": replicas}}, _request_timeout=self.timeout_s
        )
        return _replicas(scale)


def _describe(exc: Exception) -> str:
    """An API error in one line: ``404 NotFound: <the Status message>``."""
    from kubernetes.client import ApiException

    if not isinstance(exc, ApiException):
        return f"{type(exc).__name__}: {exc}"
    try:
        status = json.loads(exc.body or "{}")
    except ValueError:
        status = {}
    message = status.get("message") if isinstance(status, dict) else None
    return f"{exc.status} {exc.reason}" + (f": {message}" if message else "")


def _replicas(scale: Any) -> int:
    replicas = scale.get("spec", {}).get("replicas") if isinstance(scale, dict) else None
    if type(replicas) is not int:
        raise ValueError(f"not an autoscaling/v1 Scale with spec.replicas: {scale!r:.200}")
    return replicas


class NodeScalerMetrics:
    """The node scaler's metrics, in the coordinator's registry (``/metrics``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.decisions = Counter(
            "fleet_node_scaler_decisions_total",
            "Node scale-ups and scale-downs decided, by direction (up, down) and dry_run "
            "(true: reported only, the target not written).",
            ["direction", "dry_run"],
            registry=registry,
        )
        self.errors = Counter(
            "fleet_node_scaler_errors_total",
            "Kubernetes API calls of the node scaler that failed, by operation (read, write).",
            ["operation"],
            registry=registry,
        )
        self.target_replicas = Gauge(
            "fleet_node_scaler_target_replicas",
            "The scale target's spec.replicas as last read.",
            registry=registry,
        )
        self.wanted_replicas = Gauge(
            "fleet_node_scaler_wanted_replicas",
            "The replicas the node scaler's last decision wants.",
            registry=registry,
        )
        self.gpu_shortfall = Gauge(
            "fleet_node_scaler_gpu_shortfall",
            "GPUs of the engines no live node has the free GPUs for.",
            registry=registry,
        )
        self.idle_nodes = Gauge(
            "fleet_node_scaler_idle_nodes",
            "Nodes that ran no engine for the idle time (may be given back).",
            registry=registry,
        )


class Coordinated(Protocol):
    """What the node scaler uses of a coordinator (:class:`.service.Coordinator`)."""

    cfg: CoordinatorConfig
    placer: Placer
    groups: TPGroups
    registry: FleetRegistry
    leadership: Leadership
    metrics: CoordinatorMetrics


class NodeScaling:
    """The node scaler's loop (see the module docstring).

    Args:
        cfg: the node scaler's settings.
        api: the target's ``/scale``.
        placer, groups, registry: what placement lacks and which nodes are idle.
        leadership: only the leader (once settled) decides.
        metrics: where decisions and errors are counted.
    """

    def __init__(
        self,
        cfg: NodeScaleConfig,
        api: ScaleApi,
        *,
        placer: Placer,
        groups: TPGroups,
        registry: FleetRegistry,
        leadership: Leadership,
        metrics: NodeScalerMetrics,
    ) -> None:
        self.cfg = cfg
        self.api = api
        self.placer, self.groups, self.registry = placer, groups, registry
        self.leadership = leadership
        self.metrics = metrics
        self.scaler = NodeScaler(cfg)
        self.last: Decision | None = None  # the latest decision, for status and tests
        self._logged: tuple[object, ...] = ()

    @classmethod
    def of(cls, coordinator: Coordinated) -> NodeScaling | None:
        """The node scaler of ``coordinator`` (None: ``node_scale`` is not configured). The
        Kubernetes client is built here, for ``kube_api`` or in-cluster configuration."""
        cfg = coordinator.cfg.node_scale
        if cfg is None:
            return None
        api = ScaleApi(api_client(coordinator.cfg.kube_api), cfg.target)
        return cls(
            cfg,
            api,
            placer=coordinator.placer,
            groups=coordinator.groups,
            registry=coordinator.registry,
            leadership=coordinator.leadership,
            metrics=NodeScalerMetrics(coordinator.metrics.registry),
        )

    async def run(self) -> None:
        """Decide every ``interval_s`` until cancelled."""
        mode = " (dry run: the target is never written)" if self.cfg.dry_run else ""
        log.info("node scaler: target %s, %d..%d nodes of %d GPUs%s", self.cfg.target,
                 self.cfg.min_nodes, self.cfg.max_nodes, self.cfg.gpus_per_node, mode)  # fmt: skip
        while True:
            await self.tick()
            await trio.sleep(self.cfg.interval_s)

    async def tick(self) -> Decision | None:
        """One round: read, decide, log, count, write. None when not leading or the target
        could not be read."""
        if not self.leadership.may_place(trio.current_time()):
            return None
        try:
            replicas = await trio.to_thread.run_sync(
                self.api.read, limiter=KUBE_LIMITER, abandon_on_cancel=True
            )
        except Exception as exc:  # the API unreachable or failing: try again next tick
            self.metrics.errors.labels(operation="read").inc()
            log.warning("node scaler: cannot read %s: %s", self.api.target, _describe(exc))
            return None
        now = trio.current_time()
        short = self.placer.gpu_shortfall(self.registry, now, self.groups)
        busy = {node for node, _ in self.placer.pending().values()} | set(self.groups.held_gpus())
        decision = self.scaler.decide(
            now, replicas=replicas, short=short, idle=idle_nodes(self.registry, busy)
        )
        self.last = decision
        self._export(decision)
        if decision.direction == "hold":
            self._log_hold(decision)
            return decision
        dry = "true" if self.cfg.dry_run else "false"
        log.info("node scaler%s: %s", " (dry run)" if self.cfg.dry_run else "", decision)
        self.metrics.decisions.labels(direction=decision.direction, dry_run=dry).inc()
        self._logged = ()
        if not self.cfg.dry_run:
            try:
                await trio.to_thread.run_sync(
                    self.api.write, decision.wanted, limiter=KUBE_LIMITER, abandon_on_cancel=True
                )
            except Exception as exc:  # not applied: decided again next tick
                self.metrics.errors.labels(operation="write").inc()
                log.error("node scaler: cannot set %s to %d replicas: %s", self.api.target,
                          decision.wanted, _describe(exc))  # fmt: skip
                return decision
        self.scaler.applied(decision, now)
        return decision

    def _export(self, decision: Decision) -> None:
        self.metrics.target_replicas.set(decision.current)
        self.metrics.wanted_replicas.set(decision.wanted)
        self.metrics.gpu_shortfall.set(decision.short_gpus)
        self.metrics.idle_nodes.set(len(decision.idle))

    def _log_hold(self, decision: Decision) -> None:
        """Log a hold when its inputs changed since the last one logged (not every tick)."""
        key = (decision.current, decision.short, decision.idle, decision.reason.split(";")[0])
        if key != self._logged:
            self._logged = key
            log.info("node scaler: %s", decision)


__all__ = ["KUBE_LIMITER", "NodeScalerMetrics", "NodeScaling", "ScaleApi"]
