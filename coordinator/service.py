"""The coordinator service: HTTP front door, agent link, registry upkeep and placement.

:class:`Coordinator` owns, in one nursery: the agent link (ZMQ ROUTER), the HTTP server
(hypercorn on trio), the registry upkeep loop (expiry of silent nodes, placement), the clients
used to reach engines (:mod:`.pools`) and the fetches of remote models' tokenizer files
(:mod:`.tokenizers`). Its parts are built in ``__init__`` (nothing runs, nothing connects);
``run()`` starts them and reports ``started()`` once the link is bound and the HTTP port
listens, with the bound addresses.

It stops two ways. ``drain()`` (what ``fleet coordinator`` does on SIGTERM or SIGINT) stops
taking connections and releases the agent link at once (a successor may bind both), lets the
requests in flight finish for up to ``drain_s``, then returns. Cancellation stops everything at
once.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio
import zmq

from fleet.protocol.errors import ConfigError

from .api import create_app
from .autoscaling import Autoscaling
from .clustermodels import fleetmodels_task
from .config import CoordinatorConfig
from .deploybook import DeploymentBook
from .deployload import folder_signature, load_folder_files
from .deployment import Deployment
from .fastroutes import InferencePorts, InferenceRoutes
from .footprints import with_memory
from .httpserve import serve
from .kubescale import NodeScaling
from .kvindex import KVIndex
from .leaders import election
from .leadership import Leadership
from .link import AgentLink
from .metrics import CoordinatorMetrics
from .modelsize import ModelFootprint
from .placement import Placer
from .pools import EnginePools
from .prestage import PrestageBook
from .proxy import Gateway
from .redislimits import limits_for
from .registry import EngineView, FleetRegistry
from .respcacheflow import CachedInference, Identities
from .respcachestore import ResponseCache
from .router.config import DEFAULT_CONFIG, load_config
from .router.plugins import SessionStore
from .router.prompt import PromptTokenizer
from .router.scheduler import Scheduler
from .scaling import Scaling
from .stategauges import StateGauges
from .statemetrics import FleetStateCollector
from .tokenizers import FileFetcher, Tokenizers
from .tpgroups import TPGroups
from .versions import engines_for

log = logging.getLogger(__name__)


def _model_paths(deployments: tuple[Deployment, ...]) -> dict[str, str]:
    """Served name -> model folder (its tokenizer), the first deployment's for a shared name."""
    out: dict[str, str] = {}
    for d in deployments:
        for name in d.served_names:
            out.setdefault(name, d.model_path)
    return out


@dataclass(frozen=True)
class CoordinatorAddresses:
    """Where a running coordinator listens."""

    http_url: str
    agent_endpoint: str


class Coordinator:
    """The central service. See the module docstring for what it owns and how it stops.
    ``tokenizer_files`` fetches remote models' tokenizer files (:mod:`.tokenizers`)."""

    def __init__(
        self, cfg: CoordinatorConfig, *, tokenizer_files: FileFetcher | None = None
    ) -> None:
        self.cfg = cfg
        self.started_at = time.time()
        self.metrics = CoordinatorMetrics()
        self.registry = FleetRegistry(lost_after_s=cfg.heartbeat_interval_s * cfg.lost_after_missed)
        self.book = DeploymentBook(
            defaults=cfg.engine_defaults,
            shorthand=cfg.deployments,
            folder=Path(cfg.deployments_dir) if cfg.deployments_dir else None,
        )
        self._folder_seen: tuple[tuple[str, int, int], ...] = ()
        if self.book.folder is not None:
            models, files = load_folder_files(self.book.folder)  # a bad folder stops the start
            self.book.set_folder(models, files)
            self._folder_seen = folder_signature(self.book.folder)
        self._footprints: dict[str, ModelFootprint | None] = {}  # model folder -> its sizes
        speed = max(cfg.tier_speeds.values(), default=1.0)  # the fastest tier's units per engine
        self.scaling = Scaling(cfg.autoscale, speed)  # minReplicas/maxReplicas deployments' counts
        self.autoscaling = Autoscaling(self)  # the leader's tick, and demand shared for it
        deployments, self.deployment_notes = self.book.deployments()  # nothing scaled yet
        deployments = with_memory(deployments, self._footprints)
        self.placer = Placer(deployments, assign_timeout_s=cfg.assign_timeout_s)
        self.placer.prices = dict(cfg.gpu_prices)
        self.groups = TPGroups(assign_timeout_s=cfg.assign_timeout_s)
        self.prestages = PrestageBook()  # /admin/v1/prestage requests (prestage.py)
        leader_settle = cfg.leader_settle_s
        if leader_settle is None:
            leader_settle = 2 * cfg.heartbeat_interval_s
        # With no lock this is the only coordinator: it leads from the start (leadership.py).
        alone = cfg.leader_lock is None and cfg.leader_lease is None
        self.leadership = Leadership(settle_s=leader_settle, leader=alone)
        self._election = election(cfg, self.leadership, on_change=lambda _: self._bump())
        self._fleetmodels = fleetmodels_task(self)  # --fleetmodels NAMESPACE
        self.kvindex = KVIndex(max_entries=cfg.kv_index_max_entries)
        self.limits = limits_for(cfg, self.metrics)  # fleet-wide rate limits and queue bounds
        self.response_cache: CachedInference | None = None  # --response-cache
        if cfg.response_cache is not None:
            cache = ResponseCache(cfg.response_cache, self.metrics.registry)
            identities = Identities(self.placer, self.book, self.registry.routable)
            self.response_cache = CachedInference(cache, identities)
        profile = cfg.scheduling or load_config(DEFAULT_CONFIG, source="Fleet's default config")
        # Several coordinators: a session's engine by rendezvous hash, alike on each (plugins.py).
        sessions = SessionStore(remember=cfg.coordinators_expected == 1)
        self.scheduler = Scheduler(
            profile, self.kvindex, sessions=sessions, slots_per_engine=cfg.slots_per_engine
        )
        self.metrics.registry.register(FleetStateCollector(self))  # read at each scrape
        self.prompt_tokenizer = PromptTokenizer(_model_paths(deployments))
        self.tokenizers = Tokenizers(self.prompt_tokenizer, tokenizer_files, self.metrics)
        self.tokenizers.want(deployments)
        timeout = httpx.Timeout(
            connect=cfg.upstream_connect_timeout_s,
            read=cfg.upstream_read_timeout_s,
            write=cfg.upstream_read_timeout_s,
            pool=cfg.upstream_connect_timeout_s,
        )
        # The engines' clients connect on first use; run() closes them when it ends.
        self.pools = EnginePools(timeout=timeout, max_connections=1024, max_keepalive=128)
        self.gateway = Gateway(
            self.pools,
            self.registry,
            self.metrics,
            scheduler=self.scheduler,
            tokenizer=self.prompt_tokenizer,
            resilience=cfg.resilience,
            slots_per_engine=cfg.slots_per_engine,
            max_queue=cfg.max_queue,
            max_queue_wait_s=cfg.max_queue_wait_s,
            limits=self.limits,
            is_deployed=lambda model: bool(self.placer.serving(model)),
            engines_for=self.engines_for,
        )
        self.inference_ports = InferencePorts(
            api_keys=cfg.api_keys,
            limits=self.limits,
            metrics=self.metrics,
            context_len=self.placer.context_len,
            gateway=self.gateway,
            response_cache=self.response_cache,
        )
        self.link = AgentLink(
            endpoint=cfg.agent_endpoint,
            coordinator_id=cfg.coordinator_id,
            heartbeat_interval_s=cfg.heartbeat_interval_s,
            registry=self.registry,
            placer=self.placer,
            kvindex=self.kvindex,
            metrics=self.metrics,
            on_update=self._bump,
            groups=self.groups,
            prestages=self.prestages,
            leadership=self.leadership,
            busy=lambda engine_id: self.gateway.inflight.get(engine_id) > 0,
            drain_s=cfg.engine_drain_s,
            curve=cfg.curve_keys,
            curve_reload_s=cfg.curve_reload_s,
        )
        self._gauges = StateGauges(self)
        self._changed = trio.Event()
        self._draining = trio.Event()

    def drain(self) -> None:
        """Stop taking connections, let the requests in flight finish, then stop (see the
        module docstring)."""
        self._draining.set()

    async def changed(self) -> None:
        """Wait until the registry or the KV index may have changed."""
        await self._changed.wait()

    def _bump(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        self.gateway.admission.wake_all()  # engines may have become ready: admit who waits

    def set_deployments(self, deployments: tuple[Deployment, ...]) -> None:
        """Serve ``deployments`` from now on: new engines are placed, engines no deployment
        wants are stopped, requests route by the new served names and weights.

        Raises:
            ConfigError: two deployments with one name (nothing changes then).
        """
        self.placer.replace(deployments)
        for name, path in _model_paths(deployments).items():
            self.prompt_tokenizer.model_paths.setdefault(name, path)
        self.tokenizers.want(deployments)  # remote sources' tokenizer files, in the background
        self.link.reconcile()
        self._bump()

    def apply_declared(self) -> None:
        """Place what the deployment book declares now."""
        counts, slots = self.scaling.counts, self.scaling.slots
        deployments, self.deployment_notes = self.book.deployments(counts, slots)
        self.set_deployments(with_memory(deployments, self._footprints))

    async def reload_folder(self) -> bool:
        """Re-read the deployments folder; False (the error kept for status, the deployments
        unchanged) if it has problems."""
        folder = self.book.folder
        if folder is None:
            return True
        self._folder_seen = folder_signature(folder)
        try:
            models, files = await trio.to_thread.run_sync(load_folder_files, folder)
            self.book.set_folder(models, files)
        except ConfigError as exc:
            self.book.folder_error = str(exc)
            log.error("deployments folder not applied: %s", exc)
            return False
        log.info("deployments folder applied: %s", ", ".join(m.name for m in models) or "none")
        self.apply_declared()
        return True

    async def _watch_folder(self, folder: Path) -> None:
        """Re-read the deployments folder whenever its files change."""
        while True:
            await trio.sleep(self.cfg.deployments_poll_s)
            if folder_signature(folder) != self._folder_seen:
                await self.reload_folder()

    def engines_for(self, model: str, session: str | None) -> list[EngineView]:
        """The routable engines a request for ``model`` may go to (:mod:`.versions`)."""
        return engines_for(self.placer, self.registry.routable(), model, session)

    def served_models(self) -> list[str]:
        """Every served name with a routable engine (a deployment's names, or what an engine
        reports when no deployment owns it)."""
        names: set[str] = set()
        for engine in self.registry.routable():
            owner = self.placer.owner(engine.id)
            names.update(owner.served_names if owner is not None else (engine.model,))
        return sorted(names)

    async def run(
        self, *, task_status: trio.TaskStatus[CoordinatorAddresses] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled."""
        settle = self.cfg.placement_settle_s
        if settle is None:
            settle = self.cfg.heartbeat_interval_s * self.cfg.lost_after_missed
        self.placer.settle_until = trio.current_time() + settle
        served = trio.Event()

        async def serve_http(*, task_status: trio.TaskStatus[list[str]]) -> None:
            await serve(
                create_app(self),
                self.cfg.hypercorn(),
                drain=self._draining,
                drain_s=self.cfg.drain_s,
                grace_s=self.cfg.grace_s,
                front=InferenceRoutes(self.inference_ports),
                limits=self.cfg.front_limits(),
                task_status=task_status,
            )
            served.set()  # every request in flight finished, or drain_s passed

        try:
            async with trio.open_nursery() as nursery:
                async with trio.open_nursery() as control:  # what a drain stops at once
                    if self._fleetmodels is not None:  # the resources read before placing
                        await control.start(self._fleetmodels)
                    endpoint = await control.start(self._run_link)
                    control.start_soon(self._upkeep)
                    if self._election is not None:  # lock or lease let go when draining
                        await control.start(self._election)
                    if self.book.folder is not None:
                        control.start_soon(self._watch_folder, self.book.folder)
                    if (node_scaling := NodeScaling.of(self)) is not None:  # kubescale.py
                        control.start_soon(node_scaling.run)
                    nursery.start_soon(self.gateway.watch_silent)
                    control.start_soon(self.autoscaling.run)  # the others' demand, for the leader
                    await nursery.start(self.limits.run)
                    if self.response_cache is not None:
                        await nursery.start(self.response_cache.cache.run)
                    await nursery.start(self.tokenizers.run)
                    if self.scheduler.uses_metrics:
                        nursery.start_soon(
                            self.scheduler.stats.run,
                            lambda: [(e.id, e.url) for e in self.registry.routable()],
                            self.pools.control,
                        )
                    binds = await nursery.start(serve_http)
                    url = binds[0].replace("0.0.0.0", "127.0.0.1")
                    log.info("coordinator %s serving at %s", self.cfg.coordinator_id, url)
                    task_status.started(CoordinatorAddresses(http_url=url, agent_endpoint=endpoint))
                    await self._draining.wait()
                    log.warning(
                        "draining: no new connections; the agent link is released; requests "
                        "in flight get up to %s s",
                        self.cfg.drain_s,
                    )
                    control.cancel_scope.cancel()
                await served.wait()
                log.info("drained")
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self.cfg.grace_s):
                await self.pools.aclose()

    async def _run_link(self, *, task_status: trio.TaskStatus[str]) -> None:
        """The agent link; while its endpoint is in use (a predecessor still draining after a
        hot restart), bind again every 0.1 s for up to ``link_bind_wait_s``."""
        deadline = trio.current_time() + self.cfg.link_bind_wait_s
        while True:
            try:
                await self.link.run(task_status=task_status)
                return
            except zmq.ZMQError as exc:
                if exc.errno != errno.EADDRINUSE or trio.current_time() >= deadline:
                    raise
                await trio.sleep(0.1)

    async def _upkeep(self) -> None:
        """Expire silent nodes and keep placement reconciled."""
        while True:
            await trio.sleep(self.cfg.heartbeat_interval_s / 2)
            for node_id in self.registry.expire(trio.current_time()):
                self.metrics.nodes_lost.inc()
                node = self.registry.node(node_id)
                engines = sorted(node.engines) if node else []
                log.warning(
                    "node %s lost (no heartbeat); engines leave routing: %s", node_id, engines
                )
                for engine_id in engines:
                    self.kvindex.drop_engine(engine_id, "node_lost")
                self._bump()
            for engine_id in self.kvindex.expire(trio.current_time()):
                log.warning(
                    "KV gap of engine %s not repaired in time: its entries resynced", engine_id
                )
            self.autoscaling.tick(trio.current_time())
            self.link.reconcile()
            self.gateway.admission.wake_all()
            health = self.gateway.health  # its stalls are the gateway's watch_silent's
            self.gateway.forget([e.id for e in self.registry.engines()])
            routable = self.registry.routable()
            health.incarnations(routable)
            now = trio.current_time()
            for engine in routable:  # ready: its /health answers
                health.health_ok(engine.id, now)
            if len(self.pools) > len(self.registry.engines()):
                await self.pools.prune(e.url for e in self.registry.engines())

    def refresh_gauges(self) -> None:
        """Update the gauges that mirror registry state (called before /metrics renders)."""
        self._gauges.refresh()


__all__ = ["Coordinator", "CoordinatorAddresses", "CoordinatorConfig"]
