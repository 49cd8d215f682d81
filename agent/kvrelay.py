"""Relay one engine's KV events to the coordinator.

The relay binds a ZMQ SUB socket before its engine starts and gives the engine that endpoint, so
vLLM's publisher connects to it (REFERENCE.md: a non-wildcard endpoint makes the publisher
connect) and no event is lost to a slow subscriber join. Frames are drained in batches, decoded
with vLLM's format, and forwarded with the engine id and the engine's own sequence number. A frame
that cannot be decoded is logged and counted, never fatal. The socket outlives engine restarts:
a restarted engine starts its sequence at 0 again, which is how the coordinator knows to drop
that engine's old blocks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio
import zmq

from fleet.protocol.errors import ProtocolError
from fleet.protocol.messages import KVEventBatch
from fleet.protocol.vllm_events import decode_vllm_message
from fleet.protocol.zmqio import open_socket, recv_batch

from .metrics import AgentMetrics

log = logging.getLogger(__name__)


class KVRelay:
    """Receives one engine's KV events and hands each batch to ``forward``.

    Args:
        node_id: this node.
        engine_id: the engine.
        model: the engine's served model name.
        forward: called with each decoded batch; must not block.
        metrics: the agent's metrics.
        host: the address to bind (the engine runs on this node).
    """

    def __init__(
        self,
        *,
        node_id: str,
        engine_id: str,
        model: str,
        forward: Callable[[KVEventBatch], None],
        metrics: AgentMetrics,
        host: str = "127.0.0.1",
    ) -> None:
        self.node_id = node_id
        self.engine_id = engine_id
        self.model = model
        self.forward = forward
        self.metrics = metrics
        self.host = host
        self.endpoint = ""
        self.next_seq = 0
        self.events = 0

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, report the endpoint for the engine through ``started()``, relay until cancelled."""
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        with open_socket(ctx, zmq.SUB) as sock:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.bind(f"tcp://{self.host}:*")
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            task_status.started(self.endpoint)
            while True:
                for frames in await recv_batch(sock):
                    self._relay(frames)

    def _relay(self, frames: list[bytes]) -> None:
        labels = {"engine": self.engine_id}
        try:
            batch = decode_vllm_message(frames)
        except ProtocolError as exc:
            self.metrics.kv_rejected.labels(**labels).inc()
            log.warning("engine %s sent an undecodable KV frame: %s", self.engine_id, exc)
            return
        if batch.seq > self.next_seq:
            self.metrics.kv_gaps.labels(**labels).inc()
        self.next_seq = batch.seq + 1
        self.events += len(batch.events)
        self.metrics.kv_batches.labels(**labels).inc()
        self.metrics.kv_events.labels(**labels).inc(len(batch.events))
        self.forward(
            KVEventBatch(
                node_id=self.node_id,
                engine_id=self.engine_id,
                seq=batch.seq,
                ts=batch.ts,
                events=batch.events,
                dp_rank=batch.dp_rank,
                model=self.model,
            )
        )


__all__ = ["KVRelay"]
