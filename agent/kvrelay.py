"""Relay one engine's KV events to the coordinator, each batch exactly once and in order.

The relay binds a ZMQ SUB socket before its engine starts and gives the engine that endpoint, so
vLLM's publisher connects to it (REFERENCE.md: a non-wildcard endpoint makes the publisher
connect) and no event is lost to a slow subscriber join. Frames are drained in batches, decoded
with vLLM's format, and forwarded with the engine id and the engine's own sequence number. A frame
that cannot be decoded is logged and counted, never fatal.

Sequence numbers are checked against ``next_seq``, the one expected next, by the
:class:`~fleet.protocol.sequence.SequenceTracker` the coordinator's index uses too:

- ``seq == next_seq``: forwarded.
- ``seq > next_seq`` (a gap: PUB dropped batches): the relay asks the engine's replay socket
  (vLLM's ``replay_endpoint``, a ROUTER) for every batch from ``next_seq`` through a fresh DEALER,
  waits at most ``replay_timeout_s``, forwards the replayed batches ``next_seq .. seq - 1`` in
  order, then the live one. When the replay cannot cover the gap (no replay endpoint, no answer
  in time, a bad reply, or a first replayed batch newer than ``next_seq`` because the gap is older
  than the engine's buffer), only the live batch is forwarded, with ``resync=True``: the
  coordinator drops what it knows of the engine and starts again from that batch.
- ``seq < next_seq``: ``seq == 0`` means the engine restarted (the coordinator treats seq 0 after
  others as a restart) and is forwarded; anything else is a duplicate, dropped and counted.

- nothing for ``tail_probe_s`` (2 s): the relay asks the replay socket for batches from
  ``next_seq`` on, since a lost *last* batch has no later batch to reveal it; what comes back is
  forwarded (with ``resync=True`` if it does not start at ``next_seq``).

The relay is one task: while a replay runs, live frames wait in the SUB socket, so the order
holds. The SUB socket outlives engine restarts; :meth:`KVRelay.engine_started` tells the relay a
new engine process is starting, so that it expects seq 0 again and can replay it should the
new engine's first batch be lost.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncGenerator, Callable

import trio
import zmq

from fleet.protocol.errors import ConfigError, ProtocolError
from fleet.protocol.messages import KVEventBatch
from fleet.protocol.sequence import Order, SequenceTracker
from fleet.protocol.vllm_events import (
    VllmEventBatch,
    decode_replay_reply,
    decode_vllm_message,
)
from fleet.protocol.vllm_events_encode import encode_replay_request
from fleet.protocol.zmqio import open_socket, recv_batch, send_nowait

from .blockledger import BlockLedger
from .metrics import AgentMetrics

log = logging.getLogger(__name__)

DEFAULT_REPLAY_TIMEOUT_S = 2.0
"""How long a replay may take, request to last needed batch, before the relay gives up."""
DEFAULT_TAIL_PROBE_S = 2.0
"""How long the relay waits without a batch before asking the replay socket for lost ones."""


class KVRelay:
    """Receives one engine's KV events and hands each batch to ``forward``, repairing gaps.

    Args:
        node_id: this node.
        engine_id: the engine.
        model: the engine's served model name.
        forward: called with each batch, in sequence order; must not block.
        metrics: the agent's metrics.
        host: the address to bind (the engine runs on this node).
        replay_endpoint: the engine's KV replay socket, or None when unknown (gaps then resync).
            An attribute, so it may be set after construction, once the engine's is chosen.
        replay_timeout_s: the longest a replay may take before the gap is given up (> 0).
        tail_probe_s: after this long without a batch, the relay asks the replay socket for
            batches from ``next_seq`` on (a lost last batch has no later one to reveal it).

    Raises:
        ConfigError: ``replay_timeout_s`` is not a finite number > 0.

    Resource handling: :meth:`run` owns the SUB socket; each replay opens a DEALER and closes it
    (linger 0) before returning, also when cancelled, so late replies of a timed-out replay are
    discarded with it.
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
        replay_endpoint: str | None = None,
        replay_timeout_s: float = DEFAULT_REPLAY_TIMEOUT_S,
        tail_probe_s: float = DEFAULT_TAIL_PROBE_S,
    ) -> None:
        if not (replay_timeout_s > 0 and math.isfinite(replay_timeout_s)):
            raise ConfigError("replay_timeout_s", replay_timeout_s, "must be a finite number > 0")
        if not tail_probe_s > 0:
            raise ConfigError("tail_probe_s", tail_probe_s, "must be > 0")
        self.tail_probe_s = float(tail_probe_s)
        self.node_id = node_id
        self.engine_id = engine_id
        self.model = model
        self.forward = forward
        self.metrics = metrics
        self.host = host
        self.replay_endpoint = replay_endpoint
        self.replay_timeout_s = float(replay_timeout_s)
        self.endpoint = ""
        self.seqs: SequenceTracker[None] = SequenceTracker(first=0)  # gaps are replayed, not held
        self.events = 0
        self._labels = {"engine": engine_id}
        self._generation = 0  # engine processes started; a replay may outlive one
        self.ledger = BlockLedger()  # the engine's blocks now, for a coordinator that reconnects

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, report the endpoint for the engine through ``started()``, relay until cancelled."""
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        with open_socket(ctx, zmq.SUB) as sock:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.bind(f"tcp://{self.host}:*")
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            task_status.started(self.endpoint)
            while True:
                with trio.move_on_after(self.tail_probe_s) as idle:
                    batches = await recv_batch(sock)
                if idle.cancelled_caught:
                    await self._probe_tail()
                    continue
                for frames in batches:
                    await self._relay(frames)

    @property
    def next_seq(self) -> int:
        """The batch number expected next."""
        return self.seqs.next_seq

    def engine_started(self) -> None:
        """A new engine process is starting: its first batch will be seq 0 again."""
        self._generation += 1
        self.seqs.expect(0)

    async def _relay(self, frames: list[bytes]) -> None:
        try:
            batch = decode_vllm_message(frames)
        except ProtocolError as exc:
            self.metrics.kv_rejected.labels(**self._labels).inc()
            log.warning("engine %s sent an undecodable KV frame: %s", self.engine_id, exc)
            return
        verdict = self.seqs.classify(batch.seq)
        if verdict.order is Order.DUPLICATE:
            self.metrics.kv_duplicates.labels(**self._labels).inc()
            log.debug("engine %s: duplicate KV batch %d dropped", self.engine_id, batch.seq)
            return
        if verdict.order is Order.GAP:
            self.metrics.kv_gaps.labels(**self._labels).inc()
            generation = self._generation
            replayed = await self._replay(verdict.missing.start, verdict.missing.stop)
            if self._generation != generation:
                # The engine restarted during the replay: this batch and the replayed ones are
                # the old process's; its successor starts at 0.
                self._forward(batch, resync=True)
                self.metrics.kv_resyncs.labels(**self._labels).inc()
                self.seqs.expect(0)
                return
            if replayed is None:
                self.metrics.kv_resyncs.labels(**self._labels).inc()
                log.warning(
                    "engine %s: KV batches %d..%d lost and not replayable; resync",
                    self.engine_id,
                    self.next_seq,
                    batch.seq - 1,
                )
                self._forward(batch, resync=True)
                return
            for old in replayed:
                self._forward(old)
            self.metrics.kv_replayed_batches.labels(**self._labels).inc(len(replayed))
        self._forward(batch)

    async def _probe_tail(self) -> None:
        """After ``tail_probe_s`` without a batch, ask the replay socket for anything from
        ``next_seq`` on: a lost *last* batch leaves no gap for a later one to reveal, and
        without this the index would keep its blocks until the engine's next event."""
        if self.replay_endpoint is None:
            return
        generation = self._generation
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        tail: list[VllmEventBatch] | None = None
        with open_socket(ctx, zmq.DEALER) as sock:
            try:
                sock.connect(self.replay_endpoint)
            except zmq.ZMQError:
                return
            if not send_nowait(sock, encode_replay_request(self.next_seq)):
                return
            with trio.move_on_after(self.replay_timeout_s):
                tail = await self._collect_tail(sock)
        if not tail or self._generation != generation:
            return
        self.metrics.kv_tail_repaired.labels(**self._labels).inc(len(tail))
        first = tail[0]
        if first.seq != self.next_seq:  # older than the engine's buffer: start again there
            log.warning(
                "engine %s: KV batches %d..%d lost and not replayable; resync",
                self.engine_id,
                self.next_seq,
                first.seq - 1,
            )
            self.metrics.kv_resyncs.labels(**self._labels).inc()
            self._forward(first, resync=True)
            tail = tail[1:]
        for batch in tail:
            self._forward(batch)

    async def _collect_tail(self, sock: zmq.Socket[bytes]) -> list[VllmEventBatch] | None:
        """Every replayed batch up to the end marker, if they follow each other (else None)."""
        got: list[VllmEventBatch] = []
        async with contextlib.aclosing(self._replies(sock)) as replies:
            async for batch in replies:
                if batch is None:
                    return got
                if got and batch.seq != got[-1].seq + 1:
                    return None
                if batch.seq >= self.next_seq:
                    got.append(batch)
        return None

    async def _replies(
        self, sock: zmq.Socket[bytes]
    ) -> AsyncGenerator[VllmEventBatch | None, None]:
        """Replay replies as they come, decoded (None: the end marker); a bad one is counted
        and ends them."""
        while True:
            for frames in await recv_batch(sock):
                try:
                    batch = decode_replay_reply(frames)
                except ProtocolError as exc:
                    self.metrics.kv_rejected.labels(**self._labels).inc()
                    log.warning("engine %s sent a bad replay reply: %s", self.engine_id, exc)
                    return
                yield batch

    async def _replay(self, start: int, stop: int) -> list[VllmEventBatch] | None:
        """Fetch batches ``start .. stop - 1`` from the engine's replay socket.

        Returns:
            Exactly those batches in order, or None when the replay cannot give all of them.
        """
        if self.replay_endpoint is None:
            return None
        self.metrics.kv_replays.labels(**self._labels).inc()
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        with open_socket(ctx, zmq.DEALER) as sock:
            try:
                sock.connect(self.replay_endpoint)
            except zmq.ZMQError as exc:
                log.warning("engine %s: bad replay endpoint: %s", self.engine_id, exc)
                return None
            if not send_nowait(sock, encode_replay_request(start)):
                log.warning("engine %s: replay request for %d not sent", self.engine_id, start)
                return None
            with trio.move_on_after(self.replay_timeout_s):
                return await self._collect(sock, start, stop)
        log.warning(
            "engine %s: no complete replay from %d within %.1f s",
            self.engine_id,
            start,
            self.replay_timeout_s,
        )
        return None

    async def _collect(
        self, sock: zmq.Socket[bytes], start: int, stop: int
    ) -> list[VllmEventBatch] | None:
        got: list[VllmEventBatch] = []
        async with contextlib.aclosing(self._replies(sock)) as replies:
            async for batch in replies:
                want = start + len(got)
                if batch is None:  # the end marker, before the last batch needed
                    log.warning(
                        "engine %s: replay from %d ended before %d", self.engine_id, start, want
                    )
                    return None
                if batch.seq != want:  # older than the buffer (first seq > start), or a hole
                    log.warning(
                        "engine %s: replay from %d gave batch %d where %d was needed",
                        self.engine_id,
                        start,
                        batch.seq,
                        want,
                    )
                    return None
                got.append(batch)
                if batch.seq == stop - 1:
                    return got
        return None  # a bad reply

    def _forward(self, batch: VllmEventBatch, *, resync: bool = False) -> None:
        self.seqs.advance(batch.seq)
        self.ledger.apply(batch.seq, batch.events, reset=resync)
        self.events += len(batch.events)
        self.metrics.kv_batches.labels(**self._labels).inc()
        self.metrics.kv_events.labels(**self._labels).inc(len(batch.events))
        self.forward(
            KVEventBatch(
                node_id=self.node_id,
                engine_id=self.engine_id,
                seq=batch.seq,
                ts=batch.ts,
                events=batch.events,
                dp_rank=batch.dp_rank,
                model=self.model,
                resync=resync,
            )
        )


__all__ = ["DEFAULT_REPLAY_TIMEOUT_S", "DEFAULT_TAIL_PROBE_S", "KVRelay"]
