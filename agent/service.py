"""The node agent: GPUs, engines, KV relays, and the links to the coordinators.

:class:`Agent` owns, in one nursery: the GPU monitor (NVML, or none), one DEALER socket per
coordinator (:mod:`.links`: register, heartbeats, KV batches out; assignments in), kept in step
with a headless Service's DNS records when one is configured (:mod:`.discovery`), one supervisor
and one KV relay per assigned engine, and a small HTTP server (``/healthz``, ``/metrics``,
``/api/v1/engines``, ``/api/v1/gpus``, and ``POST /api/v1/gpus/{index}/xid``, which injects an
XID into a fake GPU). ``run()`` reports ``started()`` once the HTTP port listens, the first
Register is queued and, with a Service, its first lookup is done. It stops on cancellation:
every engine's process group gets SIGTERM, its grace period, then SIGKILL (see
:mod:`fleet.agent.supervisor`); the links close after the engines.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace

import httpx
import trio
import zmq
from hypercorn.trio import serve

import fleet
from fleet.protocol import codec, http11
from fleet.protocol.errors import ProtocolError
from fleet.protocol.messages import (
    ENGINE_KINDS,
    AssignEngine,
    EngineSpec,
    EngineStatus,
    ErrorReport,
    Heartbeat,
    KVEventBatch,
    KVSnapshot,
    Message,
    PrestageModel,
    Register,
    UnassignEngine,
    Welcome,
)
from fleet.protocol.zmqio import recv_batch, send_nowait

from .config import AgentConfig
from .discovery import DiscoveryConfig, LinkChanges, follow_service
from .fakenvml import FakeNvml
from .gpus import GpuMonitor
from .httpapi import create_app, hypercorn_config
from .kvrelay import KVRelay
from .links import CoordinatorLinks
from .metrics import AgentMetrics
from .reaper import Reaper
from .statemetrics import AgentStateCollector
from .store import ModelStore, StoreError
from .storereport import ReportThrottle, StoreState, store_state
from .supervisor import EngineSupervisor

log = logging.getLogger(__name__)

_GAUGED_STATES = ("starting", "ready", "unhealthy", "backoff", "stopping")
STORE_REPORT_EVERY_S = 0.5  # a changed model store is reported at most this often


@dataclass
class _EngineHandle:
    supervisor: EngineSupervisor
    relay: KVRelay
    scope: trio.CancelScope


class Agent:
    """The per-node service. See the module docstring for what it owns and how it stops.

    Args:
        cfg: the agent's configuration.
        nvml_module: an NVML module to use instead of importing ``pynvml`` (tests); with
            ``cfg.fake_gpus`` and none given, a :class:`FakeNvml` over them.
    """

    def __init__(self, cfg: AgentConfig, *, nvml_module: object | None = None) -> None:
        if cfg.fake_gpus and nvml_module is None:
            nvml_module = FakeNvml(cfg.fake_gpus, node=cfg.node_id)
        if getattr(nvml_module, "FLEET_FAKE", False) and not cfg.launch.fake_gpus:
            cfg = replace(cfg, launch=replace(cfg.launch, fake_gpus=True))
        self.cfg = cfg
        self.nvml_module = nvml_module
        self.metrics = AgentMetrics()
        self.gpus = GpuMonitor(cfg.gpu, nvml_module=nvml_module)
        self.metrics.registry.register(AgentStateCollector(self))  # GPUs, model cache
        self.engines: dict[str, _EngineHandle] = {}
        self.heartbeat_interval_s = cfg.heartbeat_interval_s
        self.coordinator_id = ""
        self.http_url = ""
        self.links = CoordinatorLinks(
            zmq.Context.instance(), routing_id=cfg.node_id.encode(), receive=self._receive,
            curve=cfg.curve_keys,
            refused=lambda _, f: self.metrics.link_rejected.labels(reason="curve_handshake").inc(),
        )  # fmt: skip
        self._engine_nursery: trio.Nursery | None = None
        self._client: httpx.AsyncClient | None = None
        self._reaper: Reaper | None = None  # started by run()
        self.store: ModelStore | None = None  # started by run() when cfg.store is set
        self._seq = 0
        self._wake = trio.Event()
        self._store_reports = ReportThrottle(min_interval_s=STORE_REPORT_EVERY_S)

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``started()`` gives the agent's HTTP URL."""
        self._reaper = Reaper()
        with contextlib.closing(self._reaper):
            await self._serve(task_status)

    async def _serve(self, task_status: trio.TaskStatus[str]) -> None:
        async with httpx.AsyncClient() as client, trio.open_nursery() as nursery:
            self._client = client
            await nursery.start(self.gpus.run)
            if self.cfg.store is not None:
                self.store = ModelStore(self.cfg.store, http=client)
                await nursery.start(self.store.run)
            # The links outlive the engines: an engine's last heartbeat goes out as it stops.
            with self.links:
                try:
                    async with trio.open_nursery() as engines:
                        self._engine_nursery = engines
                        for endpoint in self.cfg.coordinator_endpoints:
                            self.links.open(endpoint, engines)
                        engines.start_soon(self._heartbeats)
                        if self.store is not None:
                            engines.start_soon(self._report_store, self.store)
                        http11.install()  # never HTTP/2: hypercorn's can crash the server
                        http = hypercorn_config(self.cfg.http_host, self.cfg.http_port)
                        binds = await engines.start(serve, create_app(self), http)
                        self.http_url = binds[0]
                        self._register()
                        if self.cfg.discovery is not None:  # links to what it resolves to now
                            await engines.start(self._follow, self.cfg.discovery)
                        d = self.cfg.discovery
                        where = d.service if d is not None else self.cfg.coordinator_endpoint
                        log.info("agent %s up: http %s, coordinators %s", self.cfg.node_id,
                                 self.http_url, where)  # fmt: skip
                        task_status.started(self.http_url)
                finally:
                    self._engine_nursery = None
            nursery.cancel_scope.cancel()  # the GPU monitor and the model store

    # -- engines -----------------------------------------------------------------------------

    def assign(self, spec: EngineSpec) -> None:
        """Start an engine unless one with this id already runs (assignments are idempotent)."""
        if spec.engine_id in self.engines or self._engine_nursery is None:
            return
        if spec.kind not in ENGINE_KINDS:
            self._send(
                ErrorReport(
                    "unsupported_engine",
                    f"engine kind {spec.kind!r} is not available on this node",
                    self.cfg.node_id,
                )
            )
            return
        self._engine_nursery.start_soon(self._run_engine, spec)

    def unassign(self, engine_id: str) -> None:
        """Stop an engine and forget it."""
        handle = self.engines.get(engine_id)
        if handle is not None:
            handle.scope.cancel()

    def prestage(self, uri: str) -> None:
        """Fetch ``uri`` into the model store now, without an engine (``PrestageModel``).

        Nothing pins it: once complete it is the most recently used entry, so the LRU evicts
        it only after every older unpinned model, and an engine that starts on it pins it
        then. While it downloads the budget counts its full size, as for any download. A
        failure is reported in heartbeats (``fetches``) and not retried: prestage again.
        """
        if self.store is None or self._engine_nursery is None:
            self._send(
                ErrorReport("no_model_store", f"cannot prestage {uri}: no store", self.cfg.node_id)
            )
            return
        self._engine_nursery.start_soon(self._prestage, self.store, uri, name=f"prestage {uri}")

    async def _prestage(self, store: ModelStore, uri: str) -> None:
        try:
            path = await store.fetch(uri)
            log.info("prestaged %s at %s", uri, path)
        except StoreError as exc:
            log.warning("prestaging %s failed: %s: %s", uri, exc.kind, exc.reason)
        except RuntimeError as exc:  # the store stopped
            log.warning("prestaging %s: %s", uri, exc)
        self._heartbeat()

    async def _run_engine(self, spec: EngineSpec) -> None:
        assert self._client is not None
        with trio.CancelScope() as scope:
            relay = KVRelay(
                node_id=self.cfg.node_id,
                engine_id=spec.engine_id,
                model=spec.model,
                forward=self._send_kv,
                metrics=self.metrics,
                host=self.cfg.launch.host,
            )
            uuids = {g.index: g.uuid for g in self.gpus.snapshot()}
            try:
                async with trio.open_nursery() as nursery:
                    kv_endpoint = await nursery.start(relay.run)
                    supervisor = EngineSupervisor(
                        spec,
                        launch=self.cfg.launch,
                        cfg=self.cfg.supervisor,
                        kv_endpoint=kv_endpoint,
                        client=self._client,
                        gpu_uuids=uuids,
                        log_dir=self.cfg.log_dir,
                        on_change=self._engine_changed,
                        reaper=self._reaper,
                        store=self.store,
                    )
                    relay.replay_endpoint = supervisor.replay_endpoint
                    self.engines[spec.engine_id] = _EngineHandle(supervisor, relay, scope)
                    await nursery.start(supervisor.run)
            finally:
                self.engines.pop(spec.engine_id, None)
                for state in _GAUGED_STATES:  # an unassigned engine leaves the metrics
                    with contextlib.suppress(KeyError):
                        self.metrics.engine_state.remove(spec.engine_id, state)
                self._heartbeat()

    def _engine_changed(self, sup: EngineSupervisor) -> None:
        engine = sup.spec.engine_id
        handle = self.engines.get(engine)
        if handle is not None:  # a restart may have moved the engine's replay socket
            handle.relay.replay_endpoint = sup.replay_endpoint
        for state in _GAUGED_STATES:
            self.metrics.engine_state.labels(engine=engine, state=state).set(
                1 if sup.state == state else 0
            )
        if sup.state == "backoff":
            self.metrics.engine_restarts.labels(engine=engine).inc()
        handle = self.engines.get(engine)
        if handle is not None:
            if sup.state == "starting":  # a new process: its KV sequence starts at 0 again
                handle.relay.engine_started()
            sup.kv_events = handle.relay.events
        self._heartbeat()

    # -- the coordinator link ----------------------------------------------------------------

    async def _follow(
        self, discovery: DiscoveryConfig, *, task_status: trio.TaskStatus[None]
    ) -> None:
        """Keep a link to every coordinator behind ``discovery``'s Service."""
        await follow_service(
            discovery, self.links.endpoints, self._apply_links, task_status=task_status
        )

    def _apply_links(self, changes: LinkChanges) -> None:
        """Open and close coordinator links as discovery decided; a new coordinator gets a
        Register at once."""
        for endpoint in changes.close:
            self.links.close(endpoint)
        if self._engine_nursery is None:
            return
        for endpoint in changes.open:
            self._register(self.links.open(endpoint, self._engine_nursery))

    def _send(self, msg: Message, to: zmq.Socket[bytes] | None = None) -> None:
        """Send ``msg`` to one coordinator (``to``), or to every one."""
        frames = codec.encode(msg)
        socks = [to] if to is not None else self.links.socks
        if not socks:
            self.metrics.link_dropped.inc()  # not connected yet, or stopping
        for sock in socks:
            if not send_nowait(sock, frames):
                self.metrics.link_dropped.inc()

    def _send_kv(self, batch: KVEventBatch) -> None:
        frames = codec.encode(batch)
        socks = self.links.socks
        dropped = sum(not send_nowait(sock, frames) for sock in socks)
        if dropped or not socks:
            self.metrics.kv_dropped.labels(engine=batch.engine_id).inc()

    def statuses(self) -> tuple[EngineStatus, ...]:
        out = []
        for handle in self.engines.values():
            handle.supervisor.kv_events = handle.relay.events
            out.append(handle.supervisor.status())
        return tuple(out)

    def _send_snapshots(self, to: zmq.Socket[bytes]) -> None:
        """Give a coordinator that (re)connected every engine's blocks (its index starts full).

        Sent in one go, with no checkpoint, so no live KV batch comes between the parts."""
        for engine_id, handle in self.engines.items():
            ledger = handle.relay.ledger
            parts = ledger.snapshot()
            for i, events in enumerate(parts or [()]):
                self._send(
                    KVSnapshot(
                        node_id=self.cfg.node_id,
                        engine_id=engine_id,
                        model=handle.supervisor.spec.model,
                        seq=ledger.seq,
                        part=i,
                        parts=max(len(parts), 1),
                        events=events,
                    ),
                    to,
                )
            self.metrics.kv_snapshot_blocks.labels(engine=engine_id).inc(len(ledger))

    def model_store(self) -> StoreState:
        """What the model store holds and is fetching now (empty without a store)."""
        return self._store_state()

    def _store_state(self) -> StoreState:
        if self.store is None:
            return (), ()
        return store_state(self.store.models(), self.store.progress())

    def _register(self, to: zmq.Socket[bytes] | None = None) -> None:
        """Register with one coordinator (``to``: it did not know this node), or every one."""
        models, fetches = state = self._store_state()
        self._store_reports.sent(state, trio.current_time())
        self._send(
            Register(
                node_id=self.cfg.node_id,
                agent_url=self.http_url,
                agent_version=fleet.__version__,
                gpus=self.gpus.snapshot(),
                engines=self.statuses(),
                models=models,
                fetches=fetches,
            ),
            to,
        )

    def _heartbeat(self) -> None:
        self._seq += 1
        gpus = self.gpus.snapshot()
        healthy = not gpus or any(g.healthy for g in gpus)
        models, fetches = state = self._store_state()
        self._store_reports.sent(state, trio.current_time())
        self._send(
            Heartbeat(
                node_id=self.cfg.node_id,
                seq=self._seq,
                healthy=healthy,
                gpus=gpus,
                engines=self.statuses(),
                models=models,
                fetches=fetches,
            )
        )

    async def _report_store(self, store: ModelStore) -> None:
        """A heartbeat soon after the store's state changes (a fetch's progress, a model
        cached or evicted), at most one per ``STORE_REPORT_EVERY_S``."""
        while True:
            await trio.sleep(STORE_REPORT_EVERY_S)
            if self._store_reports.due(self._store_state(), trio.current_time()):
                self._heartbeat()

    async def _heartbeats(self) -> None:
        while True:
            await trio.sleep(self.heartbeat_interval_s)
            self._heartbeat()

    async def _receive(self, sock: zmq.Socket[bytes]) -> None:
        while True:
            for frames in await recv_batch(sock):
                try:
                    msg = codec.decode(frames)
                except ProtocolError as exc:
                    self.metrics.link_rejected.labels(reason="malformed").inc()
                    log.warning("rejected coordinator frame: %s", exc)
                    continue
                self._dispatch(msg, sock)

    def _dispatch(self, msg: Message, sock: zmq.Socket[bytes]) -> None:
        """Act on one coordinator's message (``sock``: its link). Only the leader of several
        sends assignments."""
        if isinstance(msg, AssignEngine):
            self.assign(msg.spec)
        elif isinstance(msg, UnassignEngine):
            self.unassign(msg.engine_id)
        elif isinstance(msg, PrestageModel):
            self.prestage(msg.uri)
        elif isinstance(msg, Welcome):
            self.coordinator_id = msg.coordinator_id
            self.heartbeat_interval_s = msg.heartbeat_interval_s
            self._send_snapshots(sock)
        elif isinstance(msg, ErrorReport):
            if msg.code == "unknown_node":
                log.info("coordinator does not know this node; registering again")
                self._register(sock)
            else:
                log.warning("coordinator reports %s: %s", msg.code, msg.message)
        else:
            self.metrics.link_rejected.labels(reason="direction").inc()
            log.warning("coordinator sent %s, which agents do not take", type(msg).__name__)


__all__ = ["Agent", "AgentConfig"]
