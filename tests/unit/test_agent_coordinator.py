"""Agent and coordinator in one trio run, over real ZMQ and HTTP on loopback.

Engines are the stand-in process of tests/unit/fake_engine.py, so these run in seconds; KV
events are published in vLLM's exact wire format by a real ZMQ PUB socket the test owns.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio
import zmq

from fleet.agent.launcher import LaunchConfig
from fleet.agent.service import Agent, AgentConfig
from fleet.agent.supervisor import SupervisorConfig
from fleet.coordinator.deployment import Deployment
from fleet.coordinator.kvindex import block_keys
from fleet.coordinator.prestage import PrestageRequest
from fleet.coordinator.service import Coordinator, CoordinatorAddresses, CoordinatorConfig
from fleet.protocol import codec
from fleet.protocol.kvevents import BlockRemoved, BlockStored
from fleet.protocol.messages import EngineStatus, PrestageModel, Register, UnassignEngine, Welcome
from fleet.protocol.vllm_events_encode import encode_vllm_message
from fleet.protocol.zmqio import recv_batch

from ..k8sapi import running_emulator

ROOT = Path(__file__).resolve().parents[2]
HEARTBEAT_S = 0.1
# A node is lost after this many missed beats: 1 s of silence, so a loaded machine that sends
# a beat late does not lose its node mid-test (with 3 it did, under a full unit run).
LOST_AFTER_MISSED = 10


def _coordinator(endpoint: str = "tcp://127.0.0.1:*", **kw: Any) -> Coordinator:
    """A coordinator for one real node (and fake ones): placement need not wait for others."""
    deployment = Deployment(model="m", model_path="/nowhere", replicas=1)
    return Coordinator(
        CoordinatorConfig(port=0, agent_endpoint=endpoint, deployments=(deployment,),
                          heartbeat_interval_s=HEARTBEAT_S, lost_after_missed=LOST_AFTER_MISSED,
                          placement_settle_s=0.0, grace_s=0.5, **kw)
    )  # fmt: skip


def _agent(endpoint: str, tmp_path: Path, node_id: str = "n1", **cfg: Any) -> Agent:
    launch = LaunchConfig(
        python=sys.executable,
        module="tests.unit.fake_engine",
        env=(("PYTHONPATH", str(ROOT)), ("FAKE_ENGINE_MODE", "ok")),
    )
    sup = SupervisorConfig(health_interval_s=0.1, startup_poll_s=0.05, grace_s=1.0)
    return Agent(
        AgentConfig(node_id=node_id, coordinator_endpoint=endpoint, http_port=0,
                    heartbeat_interval_s=HEARTBEAT_S, log_dir=tmp_path, launch=launch,
                    supervisor=sup, **cfg),
        nvml_module=None,
    )  # fmt: skip


async def _until(
    coord: Coordinator, predicate: Callable[[], object], timeout_s: float = 20
) -> None:
    """Wait, change by change, until the coordinator's state satisfies ``predicate``."""
    with trio.fail_after(timeout_s):
        while not predicate():
            await coord.changed()


@asynccontextmanager
async def _running(
    coord: Coordinator, agent_factory: object
) -> AsyncIterator[tuple[CoordinatorAddresses, Agent, trio.Nursery]]:
    async with trio.open_nursery() as nursery:
        addrs: CoordinatorAddresses = await nursery.start(coord.run)
        agent = agent_factory(addrs.agent_endpoint)  # type: ignore[operator]
        await nursery.start(agent.run)
        yield addrs, agent, nursery
        nursery.cancel_scope.cancel()


async def test_agent_registers_runs_its_engine_and_relays_kv_events(tmp_path: Path) -> None:
    coord = _coordinator()
    async with _running(coord, lambda ep: _agent(ep, tmp_path)) as (addrs, agent, _):
        await _until(coord, lambda: coord.registry.routable("m"))
        (engine,) = coord.registry.routable("m")
        assert engine.id == "m-0" and engine.node == "n1" and engine.pid > 0
        handle = agent.engines["m-0"]

        ctx = zmq.Context.instance()
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.connect(handle.relay.endpoint)
        tokens = list(range(100, 164))
        stored = BlockStored(block_hashes=(11, 22), parent_block_hash=None,
                             token_ids=tuple(tokens), block_size=32)  # fmt: skip
        try:
            assert handle.relay.endpoint  # bound before the engine started
            # PUB → SUB joins are asynchronous: publish until the first batch is seen.
            seq = 0
            with trio.fail_after(10):
                while coord.kvindex.engine("m-0") is None:
                    pub.send_multipart(encode_vllm_message("kv", seq, 1.0, [stored]))
                    seq += 1
                    await trio.sleep(0.05)
            keys = set(block_keys("m", tokens, 32))
            await _until(coord, lambda: coord.kvindex.engine_keys("m-0") == keys)
            pub.send_multipart(encode_vllm_message("kv", seq, 2.0, [BlockRemoved((22,))]))
            await _until(coord, lambda: len(coord.kvindex.engine_keys("m-0")) == 1)
            # A bad frame is counted and skipped; the next good batch still arrives after it.
            pub.send_multipart([b"kv", b"\x00" * 3, b"garbage"])
            pub.send_multipart(encode_vllm_message("kv", seq + 1, 3.0, [BlockRemoved((11,))]))
            await _until(coord, lambda: not coord.kvindex.engine_keys("m-0"))
            assert _metric(agent.metrics.render(), "fleet_agent_kv_rejected_total") == 1
        finally:
            pub.close()

        async with httpx.AsyncClient(base_url=addrs.http_url) as http:
            engines = (await http.get("/api/v1/engines")).json()["engines"]
            assert engines[0]["id"] == "m-0" and engines[0]["state"] == "ready"
            agent_health = (await http.get(agent.http_url + "/healthz")).json()
            assert agent_health["node"] == "n1"


async def test_silent_node_is_lost_and_leaves_routing_and_the_index() -> None:
    coord = _coordinator()
    async with trio.open_nursery() as nursery:
        addrs: CoordinatorAddresses = await nursery.start(coord.run)
        # A node that registers one ready engine and then falls silent (no Goodbye, no
        # heartbeats): spoken with the real codec over a real DEALER socket.
        ctx = zmq.Context.instance()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.ROUTING_ID, b"n9")
        dealer.connect(addrs.agent_endpoint)
        engine = EngineStatus(engine_id="m-0", model="m", url="http://127.0.0.1:9", state="ready")
        try:
            registered = trio.current_time()
            dealer.send_multipart(codec.encode(Register("n9", "http://n9", "0", (), (engine,))))
            await _until(coord, lambda: coord.registry.routable("m"))
            coord.kvindex.apply("m-0", "m", 0, [BlockStored((1,), None, tuple(range(32)), 32)])
            assert coord.kvindex.block_count() == 1
            await _until(coord, lambda: not coord.registry.routable("m"))
            took = trio.current_time() - registered
        finally:
            dealer.close()
        (node,) = coord.registry.nodes()
        assert node.lost and coord.registry.engine("m-0").state == "lost"  # type: ignore[union-attr]
        assert coord.kvindex.block_count() == 0
        # never before its missed heartbeats (how soon after: test_registry.py, explicit times)
        assert took >= HEARTBEAT_S * LOST_AFTER_MISSED
        assert _metric(coord.metrics.render(), "fleet_nodes_lost_total") == 1
        assert coord.kvindex.drops == {"node_lost": 1}  # one owner, counted by reason
        coord.refresh_gauges()
        dropped = 'fleet_kv_engine_drops_total{reason="node_lost"}'
        assert _metric(coord.metrics.render(), dropped) == 1
        nursery.cancel_scope.cancel()


async def test_a_lost_node_that_comes_back_has_its_replaced_engine_stopped(
    tmp_path: Path,
) -> None:
    """n9 runs m-0, falls silent and is lost; m-0 is placed again on n1. When n9 comes back
    still running m-0, the coordinator tells n9 to stop its copy (n1's, placed last, stays)."""
    coord = _coordinator()
    async with trio.open_nursery() as nursery:
        addrs: CoordinatorAddresses = await nursery.start(coord.run)
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.ROUTING_ID, b"n9")
        dealer.connect(addrs.agent_endpoint)
        engine = EngineStatus(engine_id="m-0", model="m", url="http://127.0.0.1:9", state="ready")
        register = codec.encode(Register("n9", "http://n9", "0", (), (engine,)))
        try:
            dealer.send_multipart(register)
            await _until(coord, lambda: coord.registry.routable("m"))
            await nursery.start(_agent(addrs.agent_endpoint, tmp_path).run)  # node n1, empty
            await _until(
                coord, lambda: [e.node for e in coord.registry.routable("m")] == ["n1"], 10
            )
            dealer.send_multipart(register)  # n9 is back, m-0 still running there
            got: list[object] = []
            with trio.fail_after(20):  # a safety bound: the answer takes milliseconds
                while not any(isinstance(m, UnassignEngine) for m in got):
                    got.extend(codec.decode(frames) for frames in await recv_batch(dealer))
            assert [m.engine_id for m in got if isinstance(m, UnassignEngine)] == ["m-0"]
        finally:
            dealer.close()
        nursery.cancel_scope.cancel()


async def test_a_node_that_registers_again_is_sent_its_prestages_again() -> None:
    """An agent that restarted lost its downloads in progress: the prestages naming its node
    are sent again when it registers (its store skips what it already holds)."""
    coord = _coordinator()
    uri = "hf://org/model@main"
    coord.prestages.add(PrestageRequest(uri, "", ("n9",), 0.0))
    coord.prestages.add(PrestageRequest("s3://bucket/other", "", ("n8",), 0.0))
    async with trio.open_nursery() as nursery:
        addrs: CoordinatorAddresses = await nursery.start(coord.run)
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.ROUTING_ID, b"n9")
        dealer.connect(addrs.agent_endpoint)
        try:
            dealer.send_multipart(codec.encode(Register("n9", "http://n9", "0", (), ())))
            got: list[object] = []
            with trio.fail_after(20):  # a safety bound: the answer takes milliseconds
                while not any(isinstance(m, PrestageModel) for m in got):
                    got.extend(codec.decode(frames) for frames in await recv_batch(dealer))
            assert isinstance(got[0], Welcome)
            assert [m.uri for m in got if isinstance(m, PrestageModel)] == [uri]  # n9's only
        finally:
            dealer.close()
        nursery.cancel_scope.cancel()


async def test_two_coordinators_one_leader_places_and_the_other_takes_over(
    tmp_path: Path,
) -> None:
    """One agent tells two coordinators everything; only the lock holder places. When the
    leader stops, the other leads: the engine is not started again, and the new leader places
    what is missing from then on."""
    lock = str(tmp_path / "leader.lock")
    a = _coordinator(leader_lock=lock, leader_retry_s=0.05, coordinator_id="coord-a")
    b = _coordinator(leader_lock=lock, leader_retry_s=0.05, coordinator_id="coord-b")
    async with trio.open_nursery() as nursery:
        a_scope = trio.CancelScope()

        async def run_a(*, task_status: trio.TaskStatus[CoordinatorAddresses]) -> None:
            with a_scope:
                await a.run(task_status=task_status)

        a_addrs: CoordinatorAddresses = await nursery.start(run_a)
        b_addrs: CoordinatorAddresses = await nursery.start(b.run)
        with trio.fail_after(10):
            while not a.leadership.leader:
                await a.changed()
        assert not b.leadership.leader
        both = f"{a_addrs.agent_endpoint},{b_addrs.agent_endpoint}"
        agent = _agent(both, tmp_path)
        await nursery.start(agent.run)
        # Both route to the engine only the leader placed.
        await _until(a, lambda: a.registry.routable("m"))
        await _until(b, lambda: b.registry.routable("m"))
        pid = agent.engines["m-0"].supervisor.pid
        assert b.placer.pending() == {} and len(agent.engines) == 1
        async with httpx.AsyncClient() as http:
            health = (await http.get(b_addrs.http_url + "/healthz")).json()
            assert (health["coordinator"], health["leader"]) == ("coord-b", False)

        a_scope.cancel()  # the leader goes; its lock with it
        await _until(b, lambda: b.leadership.may_place(trio.current_time()), 10)
        await trio.sleep(4 * HEARTBEAT_S)  # b reconciles on every beat: nothing to place
        assert b.placer.pending() == {}
        assert list(agent.engines) == ["m-0"] and agent.engines["m-0"].supervisor.pid == pid
        agent.unassign("m-0")  # the engine goes: the new leader places it again
        await _until(b, lambda: "m-0" in b.placer.pending() or not b.registry.routable("m"))
        await _until(b, lambda: b.registry.routable("m"))
        assert agent.engines["m-0"].supervisor.pid != pid
        nursery.cancel_scope.cancel()


async def test_two_coordinators_elect_through_a_kubernetes_lease(tmp_path: Path) -> None:
    """The same with a coordination.k8s.io Lease on an API server (the test emulator): one
    leads, places the engine once; when it stops it hands the Lease back and the other leads,
    the engine not started again."""
    with running_emulator() as url:
        lease = {"leader_lease": "fleet-system/fleet-leader", "kube_api": url,
                 "lease_duration_s": 2, "lease_renew_deadline_s": 1.0,
                 "leader_retry_s": 0.1}  # fmt: skip
        coords = {n: _coordinator(coordinator_id=n, **lease) for n in ("coord-a", "coord-b")}
        scopes = {n: trio.CancelScope() for n in coords}
        async with trio.open_nursery() as nursery:

            async def run(name: str, *, task_status: trio.TaskStatus[CoordinatorAddresses]) -> None:
                with scopes[name]:
                    await coords[name].run(task_status=task_status)

            addrs = {n: await nursery.start(run, n) for n in coords}
            with trio.fail_after(20):
                while sum(c.leadership.leader for c in coords.values()) != 1:
                    with trio.move_on_after(0.1):  # a leadership change bumps either one
                        await coords["coord-a"].changed()
            leader = next(n for n, c in coords.items() if c.leadership.leader)
            other = next(n for n in coords if n != leader)
            agent = _agent(",".join(a.agent_endpoint for a in addrs.values()), tmp_path)
            await nursery.start(agent.run)
            await _until(coords[other], lambda: coords[other].registry.routable("m"))
            pid = agent.engines["m-0"].supervisor.pid
            assert coords[other].placer.pending() == {} and len(agent.engines) == 1

            scopes[leader].cancel()  # it drains: the Lease is handed back
            follower = coords[other]
            await _until(follower, lambda: follower.leadership.may_place(trio.current_time()), 10)
            await trio.sleep(4 * HEARTBEAT_S)
            assert follower.placer.pending() == {}
            assert list(agent.engines) == ["m-0"] and agent.engines["m-0"].supervisor.pid == pid
            nursery.cancel_scope.cancel()


async def test_garbage_on_the_agent_link_is_counted_not_fatal(tmp_path: Path) -> None:
    coord = _coordinator()
    async with _running(coord, lambda ep: _agent(ep, tmp_path)) as (addrs, _agent_, _):
        ctx = zmq.Context.instance()
        rogue = ctx.socket(zmq.DEALER)
        rogue.setsockopt(zmq.LINGER, 0)
        rogue.connect(addrs.agent_endpoint)
        try:
            rogue.send_multipart([b"fleet/1", b"\xc1\xc1 not msgpack"])
            rogue.send_multipart([b"fleet/99", b"\x80"])
            rogue.send_multipart([b"just one frame"])
            rogue.send_multipart([b"fleet/1", b"\x81\xa4type\xa9heartbeat"])  # missing fields
            await _until(
                coord, lambda: _metric(coord.metrics.render(), "fleet_link_rejected_total") >= 4
            )
        finally:
            rogue.close()
        await _until(coord, lambda: coord.registry.routable("m"))  # the real agent still works


async def test_engines_are_placed_once_every_node_had_time_to_register(tmp_path: Path) -> None:
    """Two nodes start together: placement waits out the settle time, so the second node to
    register gets engines too instead of none (the rule itself: test_placement.py, plain calls).

    Event-driven rather than timed: both agents dial the coordinator's endpoint before it binds,
    so both registrations arrive within ZMQ's 100 ms reconnect interval of the bind, well
    inside a 2 s settle time; and a node is lost only after 100 missed 0.1 s beats, so a
    machine too busy to send a heartbeat in time does not lose one (it did under load with 3).
    """
    endpoint = f"tcp://127.0.0.1:{_free_tcp_port()}"
    coord = Coordinator(
        CoordinatorConfig(port=0, agent_endpoint=endpoint,
                          deployments=(Deployment(model="m", model_path="/nowhere", replicas=4),),
                          heartbeat_interval_s=HEARTBEAT_S, lost_after_missed=100,
                          placement_settle_s=2.0, grace_s=0.5)
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        for node in ("n1", "n2"):
            await nursery.start(_agent(endpoint, tmp_path / node, node).run)
        await nursery.start(coord.run)
        await _until(coord, lambda: len(coord.registry.routable("m")) == 4)
        nodes = sorted(e.node for e in coord.registry.routable("m"))
        assert nodes == ["n1", "n1", "n2", "n2"]
        nursery.cancel_scope.cancel()


async def test_restarted_coordinator_gets_the_running_engines_back(tmp_path: Path) -> None:
    port = _free_tcp_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    async with trio.open_nursery() as nursery:
        first = _coordinator(endpoint)
        first_scope = trio.CancelScope()
        first_stopped = trio.Event()
        nursery.start_soon(_run_in, first, first_scope, first_stopped)
        agent = _agent(endpoint, tmp_path)
        await nursery.start(agent.run)
        await _until(first, lambda: first.registry.routable("m"))
        pid = first.registry.routable("m")[0].pid
        # The engine caches two blocks, then evicts one, while the first coordinator runs.
        tokens = tuple(range(100, 164))
        keys = block_keys("m", tokens, 32)
        events: list[list[Any]] = [
            [BlockStored((11, 22), None, tokens, 32)],
            [BlockRemoved((22,))],
            [BlockStored((33,), 11, tuple(range(500, 532)), 32)],
        ]
        kept = {keys[0], *block_keys("m", tokens[:32] + tuple(range(500, 532)), 32)[1:]}
        await _publish(agent, first, events, lambda: first.kvindex.engine_keys("m-0") == kept)
        first_scope.cancel()
        await first_stopped.wait()
        # ZMQ closes the old listener asynchronously, in its I/O thread: retry the bind.
        with trio.fail_after(10):
            while True:
                second = _coordinator(endpoint)
                try:
                    await nursery.start(second.run)
                except (zmq.ZMQError, BaseExceptionGroup) as exc:
                    if not _addr_in_use(exc):
                        raise
                    await trio.sleep(0.05)
                    continue
                break
        await _until(second, lambda: second.registry.routable("m"))
        (engine,) = second.registry.routable("m")
        assert engine.pid == pid  # the engine was not restarted
        assert agent.engines["m-0"].supervisor.restarts == 0
        # No event was published since: the new index was filled from the agent's snapshot.
        await _until(second, lambda: second.kvindex.engine_keys("m-0") == kept)
        assert second.kvindex.stats["snapshots"] >= 1
        # ...and the engine's next batch continues it.
        await _publish(
            agent,
            second,
            [[BlockRemoved((11,))]],
            lambda: len(second.kvindex.engine_keys("m-0")) == 1,
            first_seq=3,
        )
        nursery.cancel_scope.cancel()


async def _publish(
    agent: Agent,
    coord: Coordinator,
    batches: list[list[Any]],
    done: Callable[[], bool],
    first_seq: int = 0,
) -> None:
    """Publish ``batches`` as the engine m-0 would (vLLM's wire format, a real PUB socket),
    until the coordinator's state satisfies ``done``. PUB → SUB joins are asynchronous, so the
    batches are sent again (duplicates are dropped) until they arrive."""
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(agent.engines["m-0"].relay.endpoint)
    try:
        with trio.fail_after(10):
            while not done():
                for i, events in enumerate(batches):
                    pub.send_multipart(encode_vllm_message("kv", first_seq + i, 1.0, events))
                with trio.move_on_after(0.1):
                    await coord.changed()
    finally:
        pub.close()


async def _run_in(
    service: Coordinator | Agent, scope: trio.CancelScope, done: trio.Event | None = None
) -> None:
    with scope:
        await service.run()
    if done is not None:
        done.set()


def _addr_in_use(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_addr_in_use(e) for e in exc.exceptions)
    return isinstance(exc, zmq.ZMQError) and exc.errno == errno.EADDRINUSE


def _free_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metric(text: bytes, name: str) -> float:
    total = 0.0
    for line in text.decode().splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total
