"""Publish KV events exactly like vLLM 0.32's ``ZmqEventPublisher``.

* **PUB socket** at ``endpoint``: an endpoint with ``*``, ``::``, ``ipc://`` or ``inproc://`` is
  bound (``tcp://*:0`` binds ``$VLLM_HOST_IP``, else 127.0.0.1, on a free port), any other is
  connected to, so a subscriber that binds first (Fleet's agent) receives from the start.
  High-water mark ``hwm``: past it, PUB drops, as in vLLM.
* **Messages** ``[topic, seq (8 bytes big-endian), payload]``: ``seq`` starts at 0 and grows by
  one per batch; the payload is :func:`~fleet.protocol.vllm_events_encode.encode_vllm_message`'s,
  which is byte-identical to vLLM's msgspec encoding, with the ``extra_keys``, ``group_idx`` and
  ``kv_cache_spec_kind`` a full-attention model's events carry.
* **Replay ROUTER** (always bound) at ``replay_endpoint``: a request ``[identity, b"", start
  (8 bytes)]`` is answered with ``[identity, b"", topic, seq, payload]`` for every buffered batch
  with ``seq >= start`` (the last ``buffer_steps`` batches), then the end marker ``[identity,
  b"", b"", b"\\xff" * 8, b""]``; anything else is logged and dropped, unanswered.

Faults: a dropped batch still takes its sequence number and enters the replay buffer (what a
subscriber sees when PUB drops on the wire); a duplicated one is sent twice with the same number.
The socket work is non-blocking; the replay loop is the only task (:meth:`serve_replay`).
"""

from __future__ import annotations

import logging
import os
import random
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Final

import trio
import zmq

from fleet.protocol.kvevents import KVEvent
from fleet.protocol.vllm_events import REPLAY_END_SEQ
from fleet.protocol.vllm_events_encode import encode_vllm_message
from fleet.protocol.zmqio import open_socket, recv_batch, send_nowait

from .config import KVEventsSettings
from .faults import FaultState

log = logging.getLogger(__name__)

KV_CACHE_SPEC_KIND: Final[str] = "full_attention"


def is_bind_endpoint(endpoint: str) -> bool:
    """vLLM's rule: wildcard and local-transport endpoints bind, the rest connect."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


class KVEventPublisher:
    """The PUB and replay ROUTER sockets of one simulated engine.

    Args:
        ctx: the ZMQ context.
        settings: ``--kv-events-config``.
        faults: returns the faults in force (drop/duplicate fractions are read per batch).
        rng: draws the faults.
        clock: the batch timestamp (vLLM uses ``time.time()``).
        dp_rank: the data-parallel rank written into each batch.

    Resource handling: sockets are created by :meth:`open` and closed (linger 0) by
    :meth:`close`; :meth:`serve_replay` runs until cancelled.
    """

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        settings: KVEventsSettings,
        *,
        faults: Callable[[], FaultState],
        rng: random.Random,
        clock: Callable[[], float],
        dp_rank: int = 0,
    ) -> None:
        self.ctx = ctx
        self.settings = settings
        self.faults = faults
        self.rng = rng
        self.clock = clock
        self.dp_rank = dp_rank
        self.topic = settings.topic
        self.endpoint = settings.endpoint
        self.replay_endpoint = settings.replay_endpoint
        self.next_seq = 0
        self.sent = 0
        self.dropped = 0
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=max(settings.buffer_steps, 1))
        self._pub: zmq.Socket[bytes] | None = None
        self._replay: zmq.Socket[bytes] | None = None
        self._stack = ExitStack()

    def open(self) -> None:
        """Create, bind or connect the sockets; resolve ``*:0`` endpoints to real ones.

        Raises:
            zmq.ZMQError: the endpoint cannot be bound or is malformed.
        """
        self._pub = self._stack.enter_context(open_socket(self.ctx, zmq.PUB, hwm=self.settings.hwm))
        if is_bind_endpoint(self.endpoint):
            self.endpoint = _bind(self._pub, self.endpoint)
        else:
            self._pub.connect(self.endpoint)
        if self.replay_endpoint is not None:
            replay = open_socket(self.ctx, zmq.ROUTER, hwm=self.settings.hwm)
            self._replay = self._stack.enter_context(replay)
            self.replay_endpoint = _bind(self._replay, self.replay_endpoint)

    def close(self) -> None:
        """Close the sockets (linger 0); idempotent."""
        self._pub = self._replay = None
        self._stack.close()

    def publish(self, events: Sequence[KVEvent]) -> int | None:
        """Send one batch (one engine step) unless it is empty.

        Returns:
            The batch's sequence number, or None when ``events`` is empty.
        """
        if not events or self._pub is None:
            return None
        seq = self.next_seq
        self.next_seq += 1
        frames = encode_vllm_message(
            self.topic,
            seq,
            self.clock(),
            events,
            self.dp_rank,
            group_idx=0,
            kv_cache_spec_kind=KV_CACHE_SPEC_KIND,
        )
        self._buffer.append((seq, frames[2]))
        action = self.faults().kv_action(self.rng)
        copies = {"send": 1, "drop": 0, "duplicate": 2}[action]
        for _ in range(copies):
            if send_nowait(self._pub, frames):
                self.sent += 1
            else:
                self.dropped += 1
        return seq

    def replay_frames(self, request: Sequence[bytes]) -> list[list[bytes]]:
        """The replies the ROUTER sends for one received message (sans-I/O).

        Args:
            request: the ROUTER's frames, ``[identity, b"", start_seq (8 bytes)]``.

        Returns:
            The reply messages, end marker last; empty for a malformed request (vLLM logs it
            and does not answer).
        """
        if len(request) != 3:
            log.warning("invalid replay request with %d frames", len(request))
            return []
        identity, _, start_bytes = request
        start = int.from_bytes(start_bytes, "big")
        topic = self.topic.encode("utf-8")
        replies = [
            [identity, b"", topic, seq.to_bytes(8, "big"), payload]
            for seq, payload in self._buffer
            if seq >= start
        ]
        replies.append([identity, b"", b"", REPLAY_END_SEQ, b""])
        return replies

    async def serve_replay(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Answer replay requests until cancelled (returns at once without a replay socket)."""
        task_status.started()
        sock = self._replay
        if sock is None:
            return
        while True:
            for request in await recv_batch(sock):
                for reply in self.replay_frames(request):
                    send_nowait(sock, reply)


def _bind(sock: zmq.Socket[bytes], endpoint: str) -> str:
    if endpoint == "tcp://*:0":
        host = os.environ.get("VLLM_HOST_IP") or "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        sock.bind(f"tcp://{host}:0")
    else:
        sock.bind(endpoint)
    bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return bound if endpoint.endswith(":0") or endpoint.endswith(":*") else endpoint


__all__ = ["KV_CACHE_SPEC_KIND", "KVEventPublisher", "is_bind_endpoint"]
