"""The KV relay against real ZMQ sockets on loopback: a test-side publisher and replay server.

The publisher is an XPUB that connects to the relay's SUB, like vLLM's PUB does, and waits for
the relay's subscription before sending, so nothing is lost to a slow join. The replay server is
a ROUTER answering like vLLM's (REFERENCE.md section 1) from a buffer the test controls, so a
batch that is "dropped" is simply buffered but not published.

Real sockets and ZMQ's I/O thread make real time pass, so a timeout is either the subject of a
test (which then runs on a ``MockClock`` and moves it explicitly) or far longer than any step can
take on a loaded machine: a test whose replay server answers must not see that answer taken for
a silence because the machine was busy.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio
import zmq

from fleet.agent.kvrelay import KVRelay
from fleet.agent.launcher import LaunchConfig, engine_command, free_port
from fleet.agent.metrics import AgentMetrics
from fleet.agent.sim.config import parse_args
from fleet.agent.sim.server import SimServer
from fleet.protocol.errors import ConfigError
from fleet.protocol.kvevents import BlockStored
from fleet.protocol.messages import EngineSpec, KVEventBatch
from fleet.protocol.vllm_events import REPLAY_END_SEQ
from fleet.protocol.vllm_events_encode import encode_vllm_message
from fleet.protocol.zmqio import open_socket, recv_batch

ENGINE = "e0"
# The longest any step here may take: a safety bound only (each takes milliseconds on an idle
# machine), so generous that a loaded CI machine never reaches it.
WAIT_S = 10.0
# The replay timeout of every test that is not about it: a replay that answers is never late.
ANSWERED_S = 60.0


def _frames(seq: int) -> list[bytes]:
    event = BlockStored(block_hashes=(1000 + seq,), parent_block_hash=None, token_ids=(seq,) * 4,
                        block_size=4)  # fmt: skip
    return encode_vllm_message("kv", seq, 1.0 + seq, [event])


@dataclass
class ReplayServer:
    """Answers replay requests from ``buffer`` (seq -> frames) unless ``silent``."""

    buffer: dict[int, list[bytes]] = field(default_factory=dict)
    silent: bool = False
    garbage: bool = False
    requests: list[int] = field(default_factory=list)
    requested: trio.Event = field(default_factory=trio.Event)
    arrived: trio.Event = field(default_factory=trio.Event)  # set and renewed per request
    endpoint: str = ""

    async def until_requests(self, n: int) -> None:
        """Wait until ``n`` replay requests have arrived in all."""
        while len(self.requests) < n:
            await self.arrived.wait()

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        with open_socket(zmq.Context.instance(), zmq.ROUTER) as sock:
            sock.bind("tcp://127.0.0.1:*")
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            task_status.started(self.endpoint)
            while True:
                for identity, _, start in await recv_batch(sock):
                    self.requests.append(int.from_bytes(start, "big"))
                    self.requested.set()
                    self.arrived.set()
                    self.arrived = trio.Event()
                    if self.silent:
                        continue
                    if self.garbage:
                        sock.send_multipart([identity, b"", b"kv", b"\x00\x01", b"junk"])
                        continue
                    for seq in sorted(self.buffer):
                        if seq >= int.from_bytes(start, "big"):
                            sock.send_multipart([identity, b"", *self.buffer[seq]])
                    sock.send_multipart([identity, b"", b"", REPLAY_END_SEQ, b""])


@dataclass
class Harness:
    relay: KVRelay
    metrics: AgentMetrics
    pub: zmq.Socket[bytes]
    replay: ReplayServer
    out: trio.MemoryReceiveChannel[KVEventBatch]
    nursery: trio.Nursery

    def publish(self, seq: int) -> None:
        """The engine publishes batch ``seq``: buffered for replay and sent."""
        self.drop(seq)
        self.pub.send_multipart(_frames(seq))

    def drop(self, seq: int) -> None:
        """The engine publishes batch ``seq`` but the subscriber never gets it."""
        self.replay.buffer[seq] = _frames(seq)

    async def received(self, n: int) -> list[tuple[int, bool]]:
        """The next ``n`` forwarded batches as (seq, resync)."""
        out = []
        with trio.fail_after(WAIT_S):
            for _ in range(n):
                batch = await self.out.receive()
                out.append((batch.seq, batch.resync))
        return out

    async def nothing_more(self) -> None:
        """Publish a marker batch after everything else and check it is the next one out."""
        seq = self.relay.next_seq
        self.publish(seq)
        assert await self.received(1) == [(seq, False)]

    def count(self, name: str) -> float:
        value = self.metrics.registry.get_sample_value(f"fleet_agent_kv_{name}", {"engine": ENGINE})
        return value or 0.0


@asynccontextmanager
async def relay_harness(
    *, replay: bool = True, timeout_s: float = ANSWERED_S, tail_probe_s: float = 60.0
) -> AsyncIterator[Harness]:
    metrics = AgentMetrics()
    send, receive = trio.open_memory_channel[KVEventBatch](1000)
    server = ReplayServer()
    async with trio.open_nursery() as nursery:
        relay = KVRelay(
            node_id="n0", engine_id=ENGINE, model="m", forward=send.send_nowait, metrics=metrics,
            replay_timeout_s=timeout_s, tail_probe_s=tail_probe_s,
        )  # fmt: skip
        if replay:
            relay.replay_endpoint = await nursery.start(server.run)
        endpoint = await nursery.start(relay.run)
        with open_socket(zmq.Context.instance(), zmq.XPUB) as pub:
            pub.connect(endpoint)
            with trio.fail_after(WAIT_S):  # the relay's subscription: from now on nothing is lost
                assert (await recv_batch(pub))[0] == [b"\x01"]
            yield Harness(relay, metrics, pub, server, receive, nursery)
            nursery.cancel_scope.cancel()


async def test_in_order_batches_are_forwarded_as_they_come() -> None:
    async with relay_harness() as h:
        for seq in range(3):
            h.publish(seq)
        assert await h.received(3) == [(0, False), (1, False), (2, False)]
        assert h.count("batches_total") == 3 and h.count("events_total") == 3
        assert h.count("gaps_total") == 0 and h.replay.requests == []


async def test_gap_is_repaired_from_the_replay_socket() -> None:
    async with relay_harness() as h:
        h.publish(0)
        h.publish(1)
        h.drop(2)
        h.drop(3)
        h.publish(4)
        h.drop(5)  # newer than the live batch: replayed but not forwarded before it
        h.publish(6)
        got = await h.received(7)
        assert got == [(seq, False) for seq in range(7)]
        assert h.replay.requests == [2, 5]
        assert h.count("gaps_total") == 2 and h.count("replays_total") == 2
        assert h.count("replayed_batches_total") == 3 and h.count("resyncs_total") == 0
        await h.nothing_more()


async def test_a_lost_last_batch_is_fetched_after_a_quiet_spell() -> None:
    async with relay_harness(tail_probe_s=0.2) as h:
        h.publish(0)
        assert await h.received(1) == [(0, False)]
        h.drop(1)
        h.drop(2)  # the engine's last batches: no later one reveals the gap
        assert await h.received(2) == [(1, False), (2, False)]
        assert h.count("tail_repaired_total") == 2 and h.count("resyncs_total") == 0
        # Quiet and nothing lost: the next probe forwards nothing. The relay handles one thing
        # at a time, so a batch that probe forwarded would come out before the marker.
        with trio.fail_after(WAIT_S):
            await h.replay.until_requests(len(h.replay.requests) + 1)
        await h.nothing_more()


async def test_a_lost_tail_older_than_the_replay_buffer_resyncs() -> None:
    async with relay_harness(tail_probe_s=0.2) as h:
        h.publish(0)
        assert await h.received(1) == [(0, False)]
        h.drop(5)  # 1..4 are gone from the engine's buffer too
        assert await h.received(1) == [(5, True)]
        assert h.count("resyncs_total") == 1


async def test_duplicates_are_dropped_and_counted() -> None:
    async with relay_harness() as h:
        for seq in (0, 1, 1, 2, 1, 3):
            h.publish(seq)
        assert await h.received(4) == [(0, False), (1, False), (2, False), (3, False)]
        assert h.count("duplicates_total") == 2
        await h.nothing_more()


async def test_gap_older_than_the_replay_buffer_resyncs() -> None:
    async with relay_harness() as h:
        h.publish(0)
        for seq in (1, 2, 3):
            h.drop(seq)
        del h.replay.buffer[0], h.replay.buffer[1]  # the buffer now starts at 2
        h.publish(4)
        h.publish(5)
        assert await h.received(3) == [(0, False), (4, True), (5, False)]
        assert h.replay.requests == [1]
        assert h.count("resyncs_total") == 1 and h.count("replayed_batches_total") == 0


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Real time plus explicit jumps: sockets work as ever, and a test moves time past a
    timeout when it chooses (pytest-trio runs the test on this clock)."""
    return trio.testing.MockClock(rate=1.0)


async def test_silent_replay_socket_resyncs_after_the_timeout(
    clock: trio.testing.MockClock,
) -> None:
    async with relay_harness(timeout_s=30) as h:
        h.replay.silent = True
        h.publish(0)
        assert await h.received(1) == [(0, False)]
        h.drop(1)
        h.publish(2)
        with trio.fail_after(WAIT_S):
            await h.replay.requested.wait()  # the relay waits for the replay from here on
        clock.jump(25)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.WouldBlock):  # 25 s (plus real time, well under 5 s): waiting
            h.out.receive_nowait()
        clock.jump(5)  # 30 s: given up; with a longer timeout it would not come within WAIT_S
        assert await h.received(1) == [(2, True)]
        assert h.count("replays_total") == 1 and h.count("resyncs_total") == 1
        await h.nothing_more()


async def test_without_a_replay_endpoint_a_gap_resyncs_at_once() -> None:
    async with relay_harness(replay=False) as h:
        h.publish(0)
        h.drop(1)
        h.publish(2)
        assert await h.received(2) == [(0, False), (2, True)]
        assert h.count("replays_total") == 0 and h.count("resyncs_total") == 1


async def test_a_bad_replay_reply_is_counted_and_resyncs() -> None:
    async with relay_harness() as h:
        h.replay.garbage = True
        h.publish(0)
        h.drop(1)
        h.publish(2)
        assert await h.received(2) == [(0, False), (2, True)]
        assert h.count("rejected_total") == 1 and h.count("resyncs_total") == 1
        await h.nothing_more()


async def test_engine_restart_at_seq_zero_is_forwarded() -> None:
    async with relay_harness() as h:
        for seq in (0, 1, 2, 0, 1):
            h.publish(seq)
        got = await h.received(5)
        assert [seq for seq, _ in got] == [0, 1, 2, 0, 1]
        assert h.count("duplicates_total") == 0 and h.count("gaps_total") == 0


async def test_restarted_engine_whose_first_batch_is_lost_is_replayed() -> None:
    async with relay_harness() as h:
        for seq in range(3):
            h.publish(seq)
        assert len(await h.received(3)) == 3
        h.relay.engine_started()  # the supervisor launches a new process
        h.replay.buffer.clear()
        h.drop(0)
        h.publish(1)
        assert await h.received(2) == [(0, False), (1, False)]
        assert h.replay.requests == [0]


async def test_cancelled_replay_forwards_nothing_and_closes() -> None:
    async with relay_harness(timeout_s=30) as h:
        h.replay.silent = True
        h.publish(0)
        assert await h.received(1) == [(0, False)]
        h.drop(1)
        h.publish(2)
        with trio.fail_after(WAIT_S):
            await h.replay.requested.wait()
        h.nursery.cancel_scope.cancel()
    assert h.relay.next_seq == 1  # the live batch waits for the replay, which never finished
    with pytest.raises(trio.WouldBlock):
        h.out.receive_nowait()


async def test_engine_restart_during_a_replay_expects_seq_zero_next(
    clock: trio.testing.MockClock,
) -> None:
    async with relay_harness(timeout_s=30) as h:
        h.replay.silent = True
        h.publish(0)
        h.drop(1)
        h.publish(2)
        with trio.fail_after(WAIT_S):
            await h.replay.requested.wait()
        h.relay.engine_started()  # surely during the replay: it ends only when time is moved
        clock.jump(30)
        assert await h.received(1) == [(0, False)]
        assert await h.received(1) == [(2, True)]  # the old process's last batch
        assert h.relay.next_seq == 0
        h.publish(0)
        assert await h.received(1) == [(0, False)]


async def test_the_simulators_dropped_and_duplicated_batches_arrive_once_in_order(
    demo_model: Path,
) -> None:
    spec = EngineSpec(engine_id=ENGINE, model="demo", model_path=str(demo_model), kind="sim")
    metrics = AgentMetrics()
    send, receive = trio.open_memory_channel[KVEventBatch](10_000)
    got: list[KVEventBatch] = []
    async with trio.open_nursery() as nursery:
        relay = KVRelay(
            node_id="n0", engine_id=ENGINE, model="demo", forward=send.send_nowait,
            metrics=metrics, replay_endpoint=f"tcp://127.0.0.1:{free_port()}",
        )  # fmt: skip
        kv_endpoint = await nursery.start(relay.run)
        argv = engine_command(
            spec, LaunchConfig(), port=0, kv_endpoint=kv_endpoint,
            replay_endpoint=relay.replay_endpoint,
        )  # fmt: skip
        faults = ["--sim-fault", "kv_drop_fraction=0.4", "--sim-fault", "kv_duplicate_fraction=0.3"]
        fast = ["--sim-prefill-ms-per-token", "0.01", "--sim-decode-ms-per-token", "0.1"]
        server = SimServer(parse_args([*argv[3:], *fast, *faults]), grace_s=0.5)
        url = await nursery.start(server.run)
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            for i in range(12):
                prompt = f"request {i}: " + "every block of this prompt is new " * 12
                body = {"model": "demo", "prompt": prompt, "max_tokens": 40}
                assert (await http.post("/v1/completions", json=body)).status_code == 200
            # A last batch that is surely sent, so that every gap before it is seen.
            assert (await http.post("/sim/faults", json={"kv_drop_fraction": 0})).status_code == 200
            body = {"model": "demo", "prompt": "the last one " * 20, "max_tokens": 1}
            assert (await http.post("/v1/completions", json=body)).status_code == 200
        published = server.publisher.next_seq
        with trio.fail_after(WAIT_S):
            while not got or got[-1].seq < published - 1:
                got.append(await receive.receive())
        nursery.cancel_scope.cancel()
    assert [b.seq for b in got] == list(range(published))
    assert not any(b.resync for b in got)
    engine = {"engine": ENGINE}
    assert (metrics.registry.get_sample_value("fleet_agent_kv_replays_total", engine) or 0) > 0
    assert (metrics.registry.get_sample_value("fleet_agent_kv_duplicates_total", engine) or 0) > 0


def test_replay_timeout_must_be_positive() -> None:
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError):
            KVRelay(node_id="n", engine_id="e", model="m", forward=lambda b: None,
                    metrics=AgentMetrics(), replay_timeout_s=bad)  # fmt: skip
