"""The coordinator's end of the agent link: one ZMQ ROUTER socket, msgpack messages.

Agents connect with a DEALER whose routing id is their node id. Every frame set that cannot be
decoded is logged and counted (``fleet_link_rejected_total``) and the loop goes on. A heartbeat
from a node the coordinator does not know (it restarted, or declared the node lost) is answered
with ``ErrorReport(code="unknown_node")``, and the agent registers again.

With ``curve`` keys the socket is a CURVE server and only authorized agents get a frame through
(:mod:`.linkauth`); without, the link is plaintext and open to anyone who reaches the endpoint
(for loopback and trusted networks: docs/SECURITY.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio
import zmq

from fleet.protocol import codec
from fleet.protocol.curve import ServerKeys
from fleet.protocol.errors import ProtocolError
from fleet.protocol.kvevents import BlockRemoved, BlockStored
from fleet.protocol.messages import (
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
from fleet.protocol.zmqio import open_socket, recv_batch, send_nowait

from .kvindex import KVIndex
from .leadership import Leadership
from .linkauth import LinkGuard
from .metrics import CoordinatorMetrics
from .placement import Placer
from .prestage import PrestageBook
from .registry import FleetRegistry
from .tpgroups import TPGroups

log = logging.getLogger(__name__)


class AgentLink:
    """Receives agent messages into the registry and KV index; sends assignments.

    Owns the ROUTER socket; :meth:`run` binds it, reports the bound endpoint through
    ``task_status.started()``, and closes it when cancelled.

    Args:
        endpoint: where to bind (``tcp://127.0.0.1:5555``; port ``*`` picks a free one).
        coordinator_id: sent to agents in Welcome.
        heartbeat_interval_s: the interval agents are told to use.
        curve: the coordinator's CURVE keys; None: a plaintext link.
        curve_reload_s: with ``curve``, how often the authorized keys' folder is read again.
    """

    def __init__(
        self,
        *,
        endpoint: str,
        coordinator_id: str,
        heartbeat_interval_s: float,
        registry: FleetRegistry,
        placer: Placer,
        kvindex: KVIndex,
        metrics: CoordinatorMetrics,
        clock: Callable[[], float] = trio.current_time,
        on_update: Callable[[], None] = lambda: None,
        groups: TPGroups | None = None,
        prestages: PrestageBook | None = None,
        leadership: Leadership | None = None,
        busy: Callable[[str], bool] = lambda engine_id: False,
        drain_s: float = 30.0,
        curve: ServerKeys | None = None,
        curve_reload_s: float = 5.0,
    ) -> None:
        self.endpoint = endpoint
        self.coordinator_id = coordinator_id
        self.heartbeat_interval_s = heartbeat_interval_s
        self.registry = registry
        self.placer = placer
        self.kvindex = kvindex
        self.metrics = metrics
        self.clock = clock
        self.on_update = on_update
        self.groups = groups  # places tensor-parallel groups, if given
        self.prestages = prestages or PrestageBook()  # sent again to a node that registers
        # Only the leader places; without one given this is the only coordinator.
        self.leadership = leadership or Leadership(settle_s=0.0, leader=True)
        # An engine no deployment wants (scaled down, deleted) left routing at once; it is
        # stopped once nothing is in flight on it (``busy``), or after ``drain_s``: streams
        # still running then are resumed on another engine.
        self.busy = busy
        self.drain_s = drain_s
        self._draining: dict[str, float] = {}  # engine id -> when it became unwanted
        self._sock: zmq.Socket[bytes] | None = None
        self.bound_endpoint = ""
        self._unassigned: dict[str, set[str]] = {}  # node -> engines asked to stop, still there
        self.curve_key = curve.public.decode() if curve is not None else ""
        self.guard = (
            LinkGuard(curve, self._count_refusal, reload_s=curve_reload_s)
            if curve is not None
            else None
        )

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, then receive until cancelled. With CURVE the link has a ZMQ context of its own
        (its ZAP handler is per context), destroyed on the way out."""
        if self.guard is None:
            await self._serve(zmq.Context.instance(), None, task_status)
            return
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        failed: zmq.ZMQError | None = None
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.guard.run, ctx)  # ZAP answers before the ROUTER binds
                try:
                    await self._serve(ctx, nursery, task_status)
                except zmq.ZMQError as exc:  # a bind that failed: raised as is, not grouped
                    failed = exc
                    nursery.cancel_scope.cancel()
        finally:
            ctx.destroy(linger=0)
        if failed is not None:
            raise failed

    async def _serve(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        guarded: trio.Nursery | None,
        task_status: trio.TaskStatus[str],
    ) -> None:
        with open_socket(ctx, zmq.ROUTER) as sock:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            if self.guard is not None and guarded is not None:
                self.guard.protect(sock, guarded)
            sock.bind(self.endpoint)
            self._sock = sock
            self.bound_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            log.info("agent link bound at %s (%s)", self.bound_endpoint,
                     "CURVE" if self.guard is not None else "plaintext")  # fmt: skip
            task_status.started(self.bound_endpoint)
            try:
                while True:
                    for frames in await recv_batch(sock):
                        self._handle(frames)
                    self.on_update()
            finally:
                self._sock = None

    def _count_refusal(self, reason: str) -> None:
        self.metrics.link_rejected.labels(reason=reason).inc()
        self.on_update()  # what the coordinator reports changed: waiters on it look again

    def send(self, node_id: str, msg: Message) -> bool:
        """Send a message to a node's agent; False (and counted) if it cannot be delivered."""
        if self._sock is None or not send_nowait(
            self._sock, [node_id.encode(), *codec.encode(msg)]
        ):
            self.metrics.link_send_dropped.inc()
            log.warning("could not send %s to node %s", type(msg).__name__, node_id)
            return False
        return True

    def reconcile(self) -> None:
        """Send whatever assignments placement wants now, and stop duplicate engines; nothing
        unless this coordinator leads (and has settled: leadership.py)."""
        if not self.leadership.may_place(self.clock()):
            return
        for placement in self.placer.reconcile(self.registry, self.clock()):
            log.info("assigning %s to node %s", placement.assign.spec.engine_id, placement.node_id)
            self.send(placement.node_id, placement.assign)
        if self.groups is not None:
            now = self.clock()
            deployments = self.placer.deployments
            settle = self.placer.settle_until
            for out in self.groups.reconcile(deployments, self.registry, now, settle_until=settle):
                self.send(out.node_id, out.message)
        for node_id, asked in list(self._unassigned.items()):
            record = self.registry.node(node_id)
            asked &= set(record.engines) if record is not None else set()
            if not asked:
                del self._unassigned[node_id]
        for node_id, engine_id in self.placer.surplus(self.registry):
            if engine_id in self._unassigned.get(node_id, set()):
                continue  # asked already; its node reports it gone with the next heartbeat
            kept = self.registry.engine(engine_id)
            log.warning(
                "engine %s runs on node %s and on %s (moved off an unhealthy GPU, or its node "
                "was lost and came back): stopping the copy on %s",
                engine_id,
                node_id,
                kept.node if kept is not None else "?",
                node_id,
            )
            self._unassigned.setdefault(node_id, set()).add(engine_id)
            # Both copies' KV events went under one id: start its index entry again.
            self.kvindex.drop_engine(engine_id, "second_copy")
            self.send(node_id, UnassignEngine(engine_id))
        for node_id, engine_id in self.placer.relocate(self.registry, self.clock()):
            if engine_id in self._unassigned.get(node_id, set()):
                continue
            log.warning(
                "engine %s on node %s runs on an unhealthy GPU and no other node has room: "
                "stopping it to place it again on the node's healthy GPUs",
                engine_id,
                node_id,
            )
            self._unassigned.setdefault(node_id, set()).add(engine_id)
            self.kvindex.drop_engine(engine_id, "relocated")
            self.send(node_id, UnassignEngine(engine_id))
        loops = self.placer.crash_loops
        loops.observe(self.registry, self.clock())
        for node_id, engine_id in loops.to_move(self.registry, self.clock()):
            if engine_id in self._unassigned.get(node_id, set()):
                continue
            log.warning(
                "engine %s keeps crashing on node %s (%d restarts in %g s): stopping it there "
                "to place it on another node",
                engine_id, node_id, loops.limit, loops.window_s,
            )  # fmt: skip
            loops.moved(node_id, engine_id, self.clock())
            self._unassigned.setdefault(node_id, set()).add(engine_id)
            self.kvindex.drop_engine(engine_id, "crash_loop")
            self.send(node_id, UnassignEngine(engine_id))
        now = self.clock()
        unwanted = self.placer.unwanted(self.registry, now)
        for engine_id in set(self._draining) - {e for _, e in unwanted}:
            del self._draining[engine_id]  # gone, or wanted again
        for node_id, engine_id in unwanted:
            if engine_id in self._unassigned.get(node_id, set()):
                continue
            since = self._draining.setdefault(engine_id, now)
            if self.busy(engine_id) and now - since < self.drain_s:
                continue  # out of routing already: its requests in flight finish first
            log.warning("engine %s on node %s: no deployment wants it now, stopping it%s",
                        engine_id, node_id,
                        " (drain time over: its streams resume elsewhere)"
                        if self.busy(engine_id) else "")  # fmt: skip
            self._unassigned.setdefault(node_id, set()).add(engine_id)
            self.send(node_id, UnassignEngine(engine_id))

    # -- receiving ---------------------------------------------------------------------------

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            self._reject("short", f"{len(frames)} frames")
            return
        identity, rest = frames[0], frames[1:]
        try:
            msg = codec.decode(rest)
        except ProtocolError as exc:
            self._reject("malformed", f"from {identity[:64]!r}: {exc}")
            return
        self.metrics.link_messages.labels(type=type(msg).__name__).inc()
        sender = getattr(msg, "node_id", None)
        if sender is not None and sender.encode() != identity:
            self._reject("identity", f"node_id {sender!r} sent from routing id {identity[:64]!r}")
            return
        if isinstance(msg, Register):
            self._on_register(msg)
        elif isinstance(msg, Heartbeat):
            self._on_heartbeat(msg)
        elif isinstance(msg, KVEventBatch):
            self._on_kv(msg)
        elif isinstance(msg, KVSnapshot):
            self._on_snapshot(msg)
        elif isinstance(msg, ErrorReport):
            log.warning("agent %s reports %s: %s", msg.node_id, msg.code, msg.message)
        else:
            self._reject("direction", f"{type(msg).__name__} is not sent by agents")

    def _reject(self, reason: str, detail: str) -> None:
        self.metrics.link_rejected.labels(reason=reason).inc()
        log.warning("rejected agent frame (%s): %s", reason, detail)

    def _on_register(self, msg: Register) -> None:
        known = self.registry.node(msg.node_id)
        if known is not None:
            # The node restarted its link: engines it no longer reports leave the index.
            for engine_id in set(known.engines) - {e.engine_id for e in msg.engines}:
                self.kvindex.drop_engine(engine_id, "engine_gone")
        self.registry.register(msg, self.clock())
        log.info(
            "node %s registered with %d GPUs, %d engines",
            msg.node_id,
            len(msg.gpus),
            len(msg.engines),
        )
        self.send(msg.node_id, Welcome(self.coordinator_id, self.heartbeat_interval_s))
        for uri in self.prestages.sources_for(msg.node_id):
            self.send(msg.node_id, PrestageModel(uri))
        self.reconcile()

    def _on_heartbeat(self, msg: Heartbeat) -> None:
        before = self.registry.node(msg.node_id)
        old = dict(before.engines) if before is not None and not before.lost else {}
        if not self.registry.heartbeat(msg, self.clock()):
            self.send(msg.node_id, ErrorReport("unknown_node", "register first", msg.node_id))
            return
        now = {e.engine_id: e for e in msg.engines}
        for engine_id, status in old.items():
            current = now.get(engine_id)
            # Gone, or restarted (a new process has an empty cache): its blocks go too.
            if current is None or current.restarts != status.restarts:
                self.kvindex.drop_engine(
                    engine_id, "engine_gone" if current is None else "engine_restarted"
                )
        self.reconcile()

    def _on_snapshot(self, msg: KVSnapshot) -> None:
        view = self.registry.engine(msg.engine_id)
        if view is None or view.node != msg.node_id:
            self._reject("unknown_engine", f"KV snapshot for unknown engine {msg.engine_id!r}")
            return
        if not 0 <= msg.part < msg.parts:
            self._reject("malformed", f"KV snapshot part {msg.part} of {msg.parts}")
            return
        self.kvindex.load_snapshot(
            msg.engine_id, msg.model, msg.seq, msg.events, first=msg.part == 0
        )
        self.metrics.kv_batches.labels(engine=msg.engine_id).inc()
        if msg.part == msg.parts - 1:
            log.info(
                "KV snapshot of %s from %s: %d blocks as of batch %d",
                msg.engine_id,
                msg.node_id,
                self.kvindex.engine_block_count(msg.engine_id),
                msg.seq,
            )

    def _on_kv(self, msg: KVEventBatch) -> None:
        model = msg.model
        view = self.registry.engine(msg.engine_id)
        if view is not None and view.node != msg.node_id:
            # Two copies of the id (one being moved): only the routed copy's blocks count.
            self.metrics.link_rejected.labels(reason="other_copy").inc()
            return
        if not model:
            if view is None:
                self._reject("unknown_engine", f"KV batch for unknown engine {msg.engine_id!r}")
                return
            model = view.model
        self.kvindex.apply(
            msg.engine_id, model, msg.seq, msg.events, resync=msg.resync, now=trio.current_time()
        )
        self.metrics.kv_batches.labels(engine=msg.engine_id).inc()
        self.metrics.kv_events.labels(engine=msg.engine_id).inc(len(msg.events))
        stored = removed = cleared = 0
        for event in msg.events:
            if isinstance(event, BlockStored):
                stored += len(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                removed += len(event.block_hashes)
            else:
                cleared += 1
        for kind, count in (("stored", stored), ("removed", removed), ("cleared", cleared)):
            if count:
                self.metrics.kv_block_events.labels(type=kind).inc(count)


__all__ = ["AgentLink"]
