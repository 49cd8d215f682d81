"""Agents find every coordinator behind one DNS name (a headless Service in Kubernetes).

The decision (which links to open and close) is a plain function, tested with plain calls. The
loop runs under trio's MockClock on scripted DNS answers (through trio's hostname-resolver
hook), and resolution is also tried on the system's resolver (``localhost``). Agents run against
real coordinators over ZMQ on loopback: one found through ``localhost:PORT``, and a coordinator
"pod" replaced by another at a new address (127.0.0.1 -> 127.0.0.2, the same port) as the
Service's record changes.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import zmq

from fleet.agent.discovery import (
    DiscoveryConfig,
    LinkChanges,
    ServiceAddress,
    follow_service,
    plan_links,
    resolve_service,
    zmq_endpoint,
)
from fleet.agent.launcher import LaunchConfig
from fleet.agent.links import CoordinatorLinks
from fleet.agent.service import Agent, AgentConfig
from fleet.agent.supervisor import SupervisorConfig
from fleet.cli import _parser
from fleet.coordinator.deployment import Deployment
from fleet.coordinator.service import Coordinator, CoordinatorAddresses, CoordinatorConfig
from fleet.protocol.errors import ConfigError
from fleet.protocol.zmqio import recv_batch

ROOT = Path(__file__).resolve().parents[2]
HEARTBEAT_S = 0.1
A, B, C = "tcp://10.0.0.1:5555", "tcp://10.0.0.2:5555", "tcp://10.0.0.3:5555"


# -- the decision ----------------------------------------------------------------------------


def test_new_addresses_are_opened_and_vanished_ones_closed() -> None:
    assert plan_links(set(), {A, B}) == LinkChanges(open=(A, B))
    assert plan_links({A, B}, {A, B}) == LinkChanges()
    assert not plan_links({A, B}, {B, A})
    # A coordinator pod replaced: its old address goes, the new one comes.
    assert plan_links({A, B}, {B, C}) == LinkChanges(open=(C,), close=(A,))
    assert plan_links({A}, {B}) == LinkChanges(open=(B,), close=(A,))


def test_a_failed_or_empty_resolution_changes_nothing() -> None:
    assert plan_links({A, B}, None) == LinkChanges()
    assert plan_links({A, B}, set()) == LinkChanges()
    assert plan_links(set(), None) == LinkChanges()


def test_links_are_capped_keeping_those_open() -> None:
    assert plan_links(set(), {C, B, A}, max_links=2) == LinkChanges(open=(A, B))
    assert plan_links({C}, {A, B, C}, max_links=2) == LinkChanges(open=(A,))
    assert plan_links({A, B}, {A, B, C}, max_links=2) == LinkChanges()
    assert plan_links({A, B}, {B, C}, max_links=1) == LinkChanges(close=(A,))


def test_endpoints_of_ipv4_and_ipv6_addresses() -> None:
    assert zmq_endpoint("10.0.0.1", 5555) == "tcp://10.0.0.1:5555"
    assert zmq_endpoint("fd00::1", 5555) == "tcp://[fd00::1]:5555"


# -- configuration ---------------------------------------------------------------------------


def test_service_address_parses_and_names_the_field_when_wrong() -> None:
    assert ServiceAddress.parse("fleet-coordinator-agents:5555") == ServiceAddress(
        "fleet-coordinator-agents", 5555
    )
    assert str(ServiceAddress.parse("a.b.svc:1")) == "a.b.svc:1"
    for bad in ("fleet", "fleet:", "fleet:http", ":5555", "fleet:0", "fleet:70000",
                "tcp://fleet:5555", "[::1]:5555"):  # fmt: skip
        with pytest.raises(ConfigError, match="coordinator_service"):
            ServiceAddress.parse(bad)


def test_discovery_config_rejects_bad_values() -> None:
    service = ServiceAddress("fleet", 5555)
    for key, value in (("interval_s", 0.0), ("timeout_s", -1.0), ("interval_s", float("nan")),
                       ("max_links", 0)):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            DiscoveryConfig(service, **{key: value})  # type: ignore[arg-type]


def test_agent_config_takes_endpoints_or_discovery_not_both() -> None:
    discovery = DiscoveryConfig(ServiceAddress("fleet", 5555))
    cfg = AgentConfig(coordinator_endpoint="", discovery=discovery)
    assert cfg.coordinator_endpoints == ()
    with pytest.raises(ConfigError, match="coordinator_endpoint"):
        AgentConfig(discovery=discovery)  # the default endpoint as well
    with pytest.raises(ConfigError, match="coordinator_endpoint"):
        AgentConfig(coordinator_endpoint="")  # neither


def test_the_cli_takes_coordinator_or_coordinator_service(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = _parser().parse_args(
        ["agent", "--coordinator-service", "fleet-coordinator-agents:5555",
         "--coordinator-resolve-interval", "2"]
    )  # fmt: skip
    assert (args.coordinator_service, args.coordinator) == ("fleet-coordinator-agents:5555", None)
    assert args.coordinator_resolve_interval == 2.0
    with pytest.raises(SystemExit):
        _parser().parse_args(
            ["agent", "--coordinator", "tcp://a:1", "--coordinator-service", "b:1"]
        )
    assert "not allowed with" in capsys.readouterr().err


# -- the loop, in virtual time ---------------------------------------------------------------

HANG = "hang"


class ScriptedDns(trio.abc.HostnameResolver):
    """trio's hostname-resolver hook (:func:`trio.socket.set_custom_hostname_resolver`)
    answering from a script: each lookup takes the next answer (a list of IP addresses, None
    for NXDOMAIN, ``HANG`` for no answer ever) or, with the script empty, ``records``."""

    def __init__(self, *script: list[str] | str | None) -> None:
        self.script = list(script)
        self.records: dict[str, list[str]] = {}
        self.asked: list[tuple[float, str, int]] = []

    async def getaddrinfo(
        self, host: bytes | str | None, port: bytes | str | int | None, *args: Any
    ) -> list[tuple[Any, ...]]:
        name = host.decode() if isinstance(host, bytes) else str(host)
        assert isinstance(port, int)
        self.asked.append((trio.current_time(), name, port))
        answer = self.script.pop(0) if self.script else self.records.get(name)
        if answer == HANG:
            await trio.sleep_forever()
        if answer is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM,
                 socket.IPPROTO_TCP, "", (ip, port)) for ip in answer]  # fmt: skip

    async def getnameinfo(self, sockaddr: Any, flags: int) -> tuple[str, str]:
        raise NotImplementedError


@contextmanager
def _dns(resolver: ScriptedDns) -> Iterator[ScriptedDns]:
    previous = trio.socket.set_custom_hostname_resolver(resolver)
    try:
        yield resolver
    finally:
        trio.socket.set_custom_hostname_resolver(previous)


async def test_follow_applies_each_resolution_every_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Every 5 s a lookup, bounded to 2 s: a failed, hung or empty one changes nothing."""
    script: tuple[list[str] | str | None, ...] = (
        ["10.0.0.1"],
        None,
        ["10.0.0.1", "10.0.0.2"],
        HANG,
        [],
        ["10.0.0.2", "10.0.0.3"],
    )
    links: set[str] = set()
    applied: list[tuple[float, LinkChanges]] = []

    def apply(changes: LinkChanges) -> None:
        applied.append((trio.current_time(), changes))
        links.difference_update(changes.close)
        links.update(changes.open)

    cfg = DiscoveryConfig(ServiceAddress("fleet", 5555), interval_s=5.0, timeout_s=2.0)
    with _dns(ScriptedDns(*script)) as dns:
        async with trio.open_nursery() as nursery:
            start = trio.current_time()
            await nursery.start(
                lambda task_status: follow_service(
                    cfg, lambda: frozenset(links), apply, task_status=task_status
                )
            )
            assert trio.current_time() == start and links == {A}  # started after the 1st answer
            await trio.sleep(28)
            nursery.cancel_scope.cancel()
    # the hung lookup at 15 s gave up at 17 s; the next came 5 s later
    assert [(t - start, name, port) for t, name, port in dns.asked] == [
        (t, "fleet", 5555) for t in (0, 5, 10, 15, 22, 27)
    ]
    assert [(t - start, c) for t, c in applied] == [
        (0, LinkChanges(open=(A,))),
        (10, LinkChanges(open=(B,))),
        (27, LinkChanges(open=(C,), close=(A,))),
    ]
    assert links == {B, C}


async def test_resolve_service_gives_endpoints_or_none(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = ServiceAddress("fleet", 5555)
    with _dns(ScriptedDns(["10.0.0.1", "fd00::1", "10.0.0.1"], None, HANG)):
        assert await resolve_service(service, 2.0) == frozenset({A, "tcp://[fd00::1]:5555"})
        assert await resolve_service(service, 2.0) is None
        start = trio.current_time()
        assert await resolve_service(service, 2.0) is None
        assert trio.current_time() - start == 2.0


# -- the real resolver -----------------------------------------------------------------------


async def test_resolve_service_asks_the_systems_resolver() -> None:
    found = await resolve_service(ServiceAddress("localhost", 5555), timeout_s=10)
    assert found is not None and "tcp://127.0.0.1:5555" in found
    assert all(e.endswith(":5555") for e in found)
    assert await resolve_service(ServiceAddress("no-such-host.invalid", 5555), 10) is None


# -- agents and coordinators on loopback -----------------------------------------------------


def _coordinator(endpoint: str) -> Coordinator:
    deployment = Deployment(model="m", model_path="/nowhere", replicas=1)
    return Coordinator(
        CoordinatorConfig(port=0, agent_endpoint=endpoint, deployments=(deployment,),
                          heartbeat_interval_s=HEARTBEAT_S, lost_after_missed=10,
                          placement_settle_s=0.0, grace_s=0.5)
    )  # fmt: skip


def _agent(tmp_path: Path, discovery: DiscoveryConfig) -> Agent:
    launch = LaunchConfig(
        python=sys.executable,
        module="tests.unit.fake_engine",
        env=(("PYTHONPATH", str(ROOT)), ("FAKE_ENGINE_MODE", "ok")),
    )
    sup = SupervisorConfig(health_interval_s=0.1, startup_poll_s=0.05, grace_s=1.0)
    cfg = AgentConfig(node_id="n1", coordinator_endpoint="", discovery=discovery, http_port=0,
                      heartbeat_interval_s=HEARTBEAT_S, log_dir=tmp_path, launch=launch,
                      supervisor=sup)  # fmt: skip
    return Agent(cfg, nvml_module=None)


async def _until(coord: Coordinator, predicate: object, timeout_s: float = 20) -> None:
    with trio.fail_after(timeout_s):
        while not predicate():  # type: ignore[operator]
            await coord.changed()


async def test_an_agent_finds_its_coordinator_through_a_dns_name(tmp_path: Path) -> None:
    """``localhost:PORT``, resolved by the system: the agent links to 127.0.0.1:PORT,
    registers, and runs the engine the coordinator places."""
    coord = _coordinator("tcp://127.0.0.1:*")
    async with trio.open_nursery() as nursery:
        addrs: CoordinatorAddresses = await nursery.start(coord.run)
        port = int(addrs.agent_endpoint.rsplit(":", 1)[1])
        discovery = DiscoveryConfig(ServiceAddress("localhost", port), interval_s=0.2)
        agent = _agent(tmp_path, discovery)
        await nursery.start(agent.run)
        assert f"tcp://127.0.0.1:{port}" in agent.links.endpoints()  # linked once started
        await _until(coord, lambda: coord.registry.routable("m"))
        (engine,) = coord.registry.routable("m")
        assert engine.node == "n1" and list(agent.engines) == ["m-0"]
        nursery.cancel_scope.cancel()


async def test_a_replaced_coordinator_is_unlinked_and_its_successor_linked(
    tmp_path: Path,
) -> None:
    """The Service's record changes from the old pod (127.0.0.1:P) to a new one
    (127.0.0.2:P): the agent registers with the new coordinator, which gets the running
    engine back (not restarted), and closes the old link, so the old coordinator hears
    nothing more and loses the node."""
    old = _coordinator("tcp://127.0.0.1:*")
    dns = ScriptedDns()
    with _dns(dns):
        async with trio.open_nursery() as nursery:
            old_addrs: CoordinatorAddresses = await nursery.start(old.run)
            port = int(old_addrs.agent_endpoint.rsplit(":", 1)[1])
            new = _coordinator(f"tcp://127.0.0.2:{port}")
            new_addrs: CoordinatorAddresses = await nursery.start(new.run)
            dns.records["fleet-coordinator-agents"] = ["127.0.0.1"]
            service = ServiceAddress("fleet-coordinator-agents", port)
            agent = _agent(tmp_path, DiscoveryConfig(service, interval_s=0.05))
            await nursery.start(agent.run)
            await _until(old, lambda: old.registry.routable("m"))
            pid = agent.engines["m-0"].supervisor.pid
            assert new.registry.node("n1") is None  # not linked: it never heard of n1

            dns.records["fleet-coordinator-agents"] = ["127.0.0.2"]  # the pod replaced
            await _until(new, lambda: new.registry.routable("m"))
            assert agent.links.endpoints() == {new_addrs.agent_endpoint}
            (engine,) = new.registry.routable("m")
            assert engine.pid == pid and agent.engines["m-0"].supervisor.restarts == 0
            await _until(old, lambda: old.registry.node("n1").lost)  # type: ignore[union-attr]
            nursery.cancel_scope.cancel()


# -- the links themselves --------------------------------------------------------------------


async def test_links_close_their_sockets_once_their_receivers_stop() -> None:
    """A closed link sends nothing more and its socket closes after its receiver stopped,
    even when closed before the receiver ran; leaving the block closes the rest."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    got_send, got = trio.open_memory_channel[list[bytes]](16)

    async def receive(sock: zmq.Socket[bytes]) -> None:
        while True:
            for frames in await recv_batch(sock):
                await got_send.send(frames)

    endpoint = f"tcp://127.0.0.1:{port}"
    other = f"tcp://127.0.0.1:{port + 1}"  # nobody: a link need not be connected
    try:
        with CoordinatorLinks(ctx, routing_id=b"n1", receive=receive) as links:
            async with trio.open_nursery() as nursery:
                sock = links.open(endpoint, nursery)
                assert links.open(endpoint, nursery) is sock  # one link per endpoint
                early = links.open(other, nursery)
                links.close(other)  # before its receiver ever ran
                assert links.endpoints() == {endpoint} and links.socks == [sock]
                sock.send_multipart([b"hello"])
                with trio.fail_after(10):
                    (frames,) = await recv_batch(router)
                assert frames == [b"n1", b"hello"]
                router.send_multipart([b"n1", b"back"])
                with trio.fail_after(10):
                    assert await got.receive() == [b"back"]
                await trio.testing.wait_all_tasks_blocked()
                assert early.closed and not sock.closed
                nursery.cancel_scope.cancel()
            assert not sock.closed  # the receiver stopped, the socket is the block's
        assert sock.closed and links.endpoints() == frozenset()
        with pytest.raises(RuntimeError, match="closed"):
            links.open(endpoint, nursery)
    finally:
        router.close()
