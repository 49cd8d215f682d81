"""CURVE on the agent link: ``fleet keys generate``, loading keys, the ZAP decision, and a real
coordinator and agent over ZMQ on loopback with rogue agents beside them.

The rogues send the chaos suite's valid, harmful messages (:func:`fleet.chaos.rogue_agent.
rogue_messages`); a plaintext coordinator is shown to accept them first, so their refusal under
CURVE is the keys' doing.
"""

from __future__ import annotations

import contextlib
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import zmq
import zmq.auth
import zmq.utils.z85

from fleet.chaos.rogue_agent import ROGUE, Rogue, rogue_messages, rogues
from fleet.cli import _parser
from fleet.coordinator.deployment import Deployment
from fleet.coordinator.linkauth import LinkGate, LogThrottle
from fleet.coordinator.service import Coordinator, CoordinatorAddresses, CoordinatorConfig
from fleet.protocol import codec
from fleet.protocol.curve import (
    ClientKeys,
    ServerKeys,
    authorized_keys,
    connect_curve,
    curve_available,
    generate_keys,
    load_client_keys,
    load_server_keys,
)
from fleet.protocol.errors import ConfigError
from fleet.protocol.kvevents import BlockStored
from fleet.protocol.messages import KVEventBatch
from fleet.protocol.zmqio import open_socket

from .test_agent_coordinator import HEARTBEAT_S, LOST_AFTER_MISSED, _agent, _metric, _until

pytestmark = pytest.mark.skipif(not curve_available(), reason="libzmq without CURVE")


# -- keys ------------------------------------------------------------------------------------


def test_fleet_keys_generate_writes_each_side_private_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    args = _parser().parse_args(["keys", "generate", str(keys)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert f"--curve-keys {keys / 'coordinator'}" in printed and "kubectl" in printed
    files = {p.relative_to(keys).as_posix(): p for p in keys.rglob("*") if p.is_file()}
    assert sorted(files) == [
        "agent/agent.key_secret",
        "agent/coordinator.key",
        "coordinator/agent.key",
        "coordinator/coordinator.key_secret",
    ]
    for name, path in files.items():
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o600 if name.endswith("_secret") else 0o644), (name, oct(mode))
    server, client = load_server_keys(keys / "coordinator"), load_client_keys(keys / "agent")
    assert client.server == server.public  # the agent trusts this coordinator
    assert authorized_keys(server) == {zmq.utils.z85.decode(client.public): "agent.key"}
    assert (
        "secret" not in repr(server).replace("secret=", "")
        and server.secret not in repr(server).encode()
    )

    with pytest.raises(ConfigError, match="--force"):
        args.func(args)
    assert load_server_keys(keys / "coordinator") == server  # untouched
    forced = _parser().parse_args(["keys", "generate", str(keys), "--force"])
    forced.func(forced)
    assert load_server_keys(keys / "coordinator").public != server.public
    assert not [p for p in keys.iterdir() if p.name.startswith(".")]  # no work folder left


def test_bad_key_folders_are_refused_naming_the_option(tmp_path: Path) -> None:
    keys = generate_keys(tmp_path / "keys")
    with pytest.raises(ConfigError, match="--curve-keys.*not a folder"):
        load_server_keys(tmp_path / "none", "--curve-keys")
    with pytest.raises(ConfigError, match="has no coordinator.key_secret"):
        load_server_keys(keys.agent)  # the agent's folder given to the coordinator
    with pytest.raises(ConfigError, match="has no coordinator.key"):
        load_client_keys(tmp_path / "keys")  # the top folder given to an agent
    (keys.agent / "second.key_secret").write_text((keys.agent / "agent.key_secret").read_text())
    with pytest.raises(ConfigError, match="one \\*.key_secret"):
        load_client_keys(keys.agent)
    (keys.coordinator / "broken.key").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="broken.key"):
        load_server_keys(keys.coordinator)


def test_up_and_coordinator_children_get_their_sides_folder(tmp_path: Path) -> None:
    from fleet.cli import _parser_of, _shared_flags
    from fleet.keyscli import up_keys
    from fleet.upmany import child_argv

    keys = generate_keys(tmp_path / "keys")
    args = _parser().parse_args(["up", "--curve-keys", str(tmp_path / "keys")])
    pair = up_keys(args)
    assert pair is not None and pair[1].server == pair[0].public
    flags = _shared_flags(args, _parser_of("up"), _parser_of("coordinator"))
    assert not [f for f in flags if f.startswith("--curve-keys")]  # not the top folder
    argv = child_argv(flags, index=0, endpoint="tcp://127.0.0.1:1", lock=tmp_path / "l",
                      log_dir=tmp_path, curve_keys=args.curve_keys)(3, 4)  # fmt: skip
    assert f"--curve-keys={keys.coordinator}" in argv
    child = _parser().parse_args(argv[argv.index("coordinator") :])
    assert load_server_keys(child.curve_keys) == pair[0]


# -- the ZAP decision (no sockets) -----------------------------------------------------------


def _zap(key: bytes, mechanism: bytes = b"CURVE") -> list[bytes]:
    return [b"peer", b"", b"1.0", b"7", b"fleet-agent-link", b"10.0.0.9", b"", mechanism, key]


def test_the_gate_lets_in_authorized_keys_only_and_takes_new_sets() -> None:
    good, other = b"g" * 32, b"o" * 32
    gate = LinkGate({good: "agent.key"})
    let_in = gate.decide(_zap(good))
    assert let_in is not None and let_in.refused is None
    assert let_in.reply == [b"peer", b"", b"1.0", b"7", b"200", b"OK", b"agent.key", b""]
    refused = gate.decide(_zap(other))
    assert refused is not None and refused.reply[4] == b"400" and refused.address == "10.0.0.9"
    assert zmq.utils.z85.encode(other).decode() in (refused.refused or "")
    plain = gate.decide(_zap(b"", mechanism=b"NULL")[:8])
    assert plain is not None and plain.reply[4] == b"400" and "NULL" in (plain.refused or "")
    assert gate.decide([b"peer", b"", b"2.0", b"1"]) is None  # not a ZAP request

    assert gate.replace({other: "new.key"}) == (["new.key"], ["agent.key"])
    assert gate.decide(_zap(good)).reply[4] == b"400"  # type: ignore[union-attr]
    assert gate.decide(_zap(other)).reply[4] == b"200"  # type: ignore[union-attr]


def test_refusal_lines_are_throttled_per_reason_and_say_how_many_were_quiet() -> None:
    throttle = LogThrottle(10.0)
    assert throttle.allow("curve_key", 0.0) == 0
    assert throttle.allow("curve_key", 1.0) is None
    assert throttle.allow("curve_key", 9.9) is None
    assert throttle.allow("curve_handshake", 5.0) == 0  # its own budget
    assert throttle.allow("curve_key", 10.0) == 2
    assert throttle.allow("curve_key", 11.0) is None


# -- a real coordinator, a real agent, rogues ------------------------------------------------


def _coordinator(curve: ServerKeys | None, reload_s: float = 5.0) -> Coordinator:
    deployment = Deployment(model="m", model_path="/nowhere", replicas=1)
    return Coordinator(
        CoordinatorConfig(port=0, agent_endpoint="tcp://127.0.0.1:*", deployments=(deployment,),
                          heartbeat_interval_s=HEARTBEAT_S, lost_after_missed=LOST_AFTER_MISSED,
                          placement_settle_s=0.0, grace_s=0.5, curve_keys=curve,
                          curve_reload_s=reload_s)
    )  # fmt: skip


@contextlib.contextmanager
def _rogue(rogue: Rogue, endpoint: str) -> Iterator[zmq.Socket[bytes]]:
    with open_socket(zmq.Context.instance(), zmq.DEALER) as sock:
        sock.setsockopt(zmq.ROUTING_ID, rogue.identity)
        if rogue.curve is not None:
            connect_curve(sock, rogue.curve)
        sock.connect(endpoint)
        yield sock


def _send_rogue_messages(sock: zmq.Socket[bytes], known_node: str) -> None:
    for msg in rogue_messages(known_node, "m-0", "m"):
        sock.send_multipart(codec.encode(msg), zmq.NOBLOCK)


def _last_seen(coord: Coordinator, node_id: str) -> float:
    node = coord.registry.node(node_id)
    return node.last_seen if node is not None and not node.lost else -1.0


def _refused(coord: Coordinator, reason: str) -> float:
    text = coord.metrics.render().decode()
    line = f'fleet_link_rejected_total{{reason="{reason}"}} '
    return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(line))


async def test_without_curve_the_rogue_messages_would_register_a_node() -> None:
    coord = _coordinator(None)
    async with trio.open_nursery() as nursery:
        addrs: CoordinatorAddresses = await nursery.start(coord.run)
        (plain, *_) = rogues("n1", b"x" * 40)
        with _rogue(plain, addrs.agent_endpoint) as sock:
            _send_rogue_messages(sock, "n1")
            await _until(coord, lambda: coord.registry.node(ROGUE) is not None)
            await _until(coord, lambda: coord.kvindex.engine(f"{ROGUE}-0") is not None)
        nursery.cancel_scope.cancel()


async def test_only_the_keyed_agent_gets_through_and_every_rogue_is_counted(
    tmp_path: Path,
) -> None:
    keys = generate_keys(tmp_path / "keys")
    coord = _coordinator(load_server_keys(keys.coordinator))
    client = load_client_keys(keys.agent)
    async with trio.open_nursery() as nursery:
        addrs: CoordinatorAddresses = await nursery.start(coord.run)
        agent = _agent(addrs.agent_endpoint, tmp_path, curve_keys=client)
        await nursery.start(agent.run)
        await _until(coord, lambda: coord.registry.routable("m"))  # registered, placed, ready
        (engine,) = coord.registry.routable("m")
        assert engine.node == "n1"

        # Its KV events reach the index through the encrypted link.
        pub = zmq.Context.instance().socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.connect(agent.engines["m-0"].relay.endpoint)
        try:
            from fleet.protocol.vllm_events_encode import encode_vllm_message

            stored = BlockStored(block_hashes=(11,), parent_block_hash=None,
                                 token_ids=tuple(range(32)), block_size=32)  # fmt: skip
            with trio.fail_after(10):
                seq = 0
                while coord.kvindex.engine("m-0") is None:
                    pub.send_multipart(encode_vllm_message("kv", seq, 1.0, [stored]))
                    seq += 1
                    await trio.sleep(0.05)
        finally:
            pub.close()
        blocks = len(coord.kvindex.engine_keys("m-0"))
        assert blocks == 1

        crew = rogues("n1", load_server_keys(keys.coordinator).public)
        with contextlib.ExitStack() as stack:
            for rogue in crew:
                _send_rogue_messages(stack.enter_context(_rogue(rogue, addrs.agent_endpoint)), "n1")
            # plaintext, plaintext impostor, another coordinator's key; the unauthorized key
            await _until(coord, lambda: _refused(coord, "curve_handshake") >= 3)
            await _until(coord, lambda: _refused(coord, "curve_key") >= 1)
            node = coord.registry.node("n1")
            assert node is not None
            seen = node.last_seen  # the agent's heartbeats go on
            await _until(coord, lambda: _last_seen(coord, "n1") > seen + 3 * HEARTBEAT_S)

        assert coord.registry.node(ROGUE) is None
        assert coord.kvindex.engine(f"{ROGUE}-0") is None
        assert len(coord.kvindex.engine_keys("m-0")) == blocks  # the impostor's clear: not seen
        assert [e.id for e in coord.registry.routable("m")] == ["m-0"]
        rendered = coord.metrics.render()
        assert _metric(rendered, 'fleet_link_messages_total{type="Register"}') == 1  # agent's
        assert _refused(coord, "malformed") == _refused(coord, "identity") == 0
        nursery.cancel_scope.cancel()


async def test_an_agent_holding_a_key_not_authorized_is_told_and_counted(tmp_path: Path) -> None:
    keys = generate_keys(tmp_path / "keys")
    coord = _coordinator(load_server_keys(keys.coordinator))
    public, secret = zmq.curve_keypair()
    stranger = ClientKeys(public, secret, load_server_keys(keys.coordinator).public)
    async with trio.open_nursery() as nursery:
        addrs: CoordinatorAddresses = await nursery.start(coord.run)
        agent = _agent(addrs.agent_endpoint, tmp_path, curve_keys=stranger)
        await nursery.start(agent.run)
        await _until(coord, lambda: _refused(coord, "curve_key") >= 1)
        # The agent's own count comes from its socket's monitor, on its own time; no event
        # tells the test, so it looks a few times.
        with trio.fail_after(10):
            while _metric(agent.metrics.render(), "fleet_agent_link_rejected_total") < 1:  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert coord.registry.node("n1") is None and not coord.registry.engines()
        nursery.cancel_scope.cancel()


async def test_keys_added_to_the_folder_are_let_in_and_removed_ones_refused(
    tmp_path: Path,
) -> None:
    keys = generate_keys(tmp_path / "keys")
    server = load_server_keys(keys.coordinator)
    coord = _coordinator(server, reload_s=0.1)
    public, secret = zmq.curve_keypair()
    newcomer = Rogue("new agent", ROGUE.encode(), ClientKeys(public, secret, server.public))

    async def attempt(endpoint: str) -> bool:
        """Whether the newcomer's registration reaches the registry (a fresh socket)."""
        with _rogue(newcomer, endpoint) as sock:
            sock.send_multipart(codec.encode(rogue_messages("n1", "m-0", "m")[0]), zmq.NOBLOCK)
            with trio.move_on_after(1.0):
                await _until(coord, lambda: coord.registry.node(ROGUE) is not None)
                return True
        return False

    async with trio.open_nursery() as nursery:
        addrs: CoordinatorAddresses = await nursery.start(coord.run)
        assert not await attempt(addrs.agent_endpoint)
        assert _refused(coord, "curve_key") >= 1

        cert = keys.coordinator / "new-agent.key"
        cert.write_text(f'curve\n    public-key = "{public.decode()}"\n')
        await trio.sleep(0.3)  # two reloads
        assert await attempt(addrs.agent_endpoint)

        cert.unlink()
        await trio.sleep(0.3)
        refused = _refused(coord, "curve_key")
        with _rogue(newcomer, addrs.agent_endpoint):
            await _until(coord, lambda: _refused(coord, "curve_key") > refused)
        nursery.cancel_scope.cancel()


async def test_a_second_coordinator_in_the_process_has_its_own_zap_handler(
    tmp_path: Path,
) -> None:
    keys = generate_keys(tmp_path / "keys")
    other = generate_keys(tmp_path / "other")
    first = _coordinator(load_server_keys(keys.coordinator))
    second = _coordinator(load_server_keys(other.coordinator))
    async with trio.open_nursery() as nursery:
        a: CoordinatorAddresses = await nursery.start(first.run)
        b: CoordinatorAddresses = await nursery.start(second.run)
        # The first one's agent key is not the second one's: each gate decides for its link.
        client = load_client_keys(keys.agent)
        wrong = ClientKeys(client.public, client.secret, load_server_keys(other.coordinator).public)
        with _rogue(Rogue("a", ROGUE.encode(), client), a.agent_endpoint) as ok:
            with _rogue(Rogue("b", ROGUE.encode(), wrong), b.agent_endpoint):
                _send_rogue_messages(ok, "n1")
                await _until(first, lambda: first.registry.node(ROGUE) is not None)
                await _until(second, lambda: _refused(second, "curve_key") >= 1)
        assert _refused(first, "curve_key") == 0
        nursery.cancel_scope.cancel()


def test_rogue_kv_batches_name_the_engine_they_would_harm() -> None:
    msgs = rogue_messages("n1", "m-0", "m")
    impostor = [m for m in msgs if isinstance(m, KVEventBatch) and m.node_id == "n1"]
    assert impostor and impostor[0].engine_id == "m-0" and impostor[0].resync
