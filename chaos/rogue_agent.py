"""``rogue-agent``: agents without the fleet's key try the CURVE-protected agent link.

Four rogues connect to the coordinator's agent endpoint beside a good load, each sending valid
messages that would change the fleet if they got through (:func:`rogue_messages`): a new node
registering a ready engine of the served model, its heartbeat and KV batch, and an impostor of
a live node reporting it unhealthy with no engines and clearing an engine's KV index entry.

==========================  =================================================================
plaintext                   a DEALER with no security (what any process on the network has)
plaintext impostor          the same, with a live node's routing id
unauthorized key            a CURVE client with a fresh key pair and the coordinator's public
                            key (``/api/v1/nodes`` reports it: public, it lets no one in)
other coordinator's key     a CURVE client with a fresh key pair and a key no coordinator has
==========================  =================================================================

Each must be refused at the handshake and counted in ``fleet_link_rejected_total``
(``curve_handshake``; ``curve_key`` for the unauthorized key) and nothing must change: no node
or engine of theirs, no KV batch of theirs indexed, no frame of theirs decoded, the live node
live and its engines ready. The rogues also watch their own sockets: each sees its handshake
fail.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import trio
import zmq

from fleet.protocol import codec
from fleet.protocol.curve import HANDSHAKE_FAILED, ClientKeys, connect_curve, handshake_failure
from fleet.protocol.kvevents import AllBlocksCleared, BlockStored
from fleet.protocol.messages import EngineStatus, Heartbeat, KVEventBatch, Message, Register
from fleet.protocol.zmqio import open_socket, recv_batch, send_nowait

from .errors import ChaosError
from .load import background, run_clock
from .outcomes import figures
from .scenarios import ChaosConfig, Figures, load_spec
from .target import Target, by_label, total

ROGUE = "chaos-rogue"
WAIT_S = 5.0  # for every rogue's refusal to be counted
HOLD_S = 1.0  # rogues stay connected (and retry) this long after that


def rogue_messages(known_node: str, known_engine: str, model: str) -> list[Message]:
    """Valid messages that would change the fleet if accepted: a node of the rogue's own with a
    ready engine of ``model``, and an impostor of ``known_node`` (unhealthy, no engines, its
    engine's KV index entry cleared)."""
    engine = EngineStatus(f"{ROGUE}-0", model, "http://192.0.2.1:8000", "ready")
    stored = BlockStored(block_hashes=(0xC0FFEE,), parent_block_hash=None,
                         token_ids=tuple(range(32)), block_size=32)  # fmt: skip
    return [
        Register(ROGUE, "http://192.0.2.1:8081", "0.0.0", engines=(engine,)),
        Heartbeat(ROGUE, seq=1, healthy=True, engines=(engine,)),
        KVEventBatch(ROGUE, engine.engine_id, seq=0, ts=0.0, events=(stored,), model=model),
        Heartbeat(known_node, seq=10**9, healthy=False),
        KVEventBatch(
            known_node, known_engine, 10**9, 0.0, (AllBlocksCleared(),), model=model, resync=True
        ),
    ]


@dataclass(frozen=True)
class Rogue:
    """One rogue: its name, routing id and security (None: plaintext)."""

    name: str
    identity: bytes
    curve: ClientKeys | None


def rogues(known_node: str, server_key: bytes) -> list[Rogue]:
    """The four rogues of the module docstring."""

    def fresh(server: bytes) -> ClientKeys:
        public, secret = zmq.curve_keypair()
        return ClientKeys(public, secret, server)

    return [
        Rogue("plaintext", ROGUE.encode(), None),
        Rogue("plaintext impostor", known_node.encode(), None),
        Rogue("unauthorized key", ROGUE.encode(), fresh(server_key)),
        Rogue("other coordinator's key", ROGUE.encode(), fresh(zmq.curve_keypair()[0])),
    ]


@contextlib.contextmanager
def _socket(rogue: Rogue, endpoint: str) -> Iterator[tuple[zmq.Socket[bytes], zmq.Socket[bytes]]]:
    """The rogue's DEALER, connected, and a monitor of its failed handshakes."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    with open_socket(ctx, zmq.DEALER) as sock:
        sock.setsockopt(zmq.ROUTING_ID, rogue.identity)
        if rogue.curve is not None:
            connect_curve(sock, rogue.curve)
        monitor: zmq.Socket[bytes] = sock.get_monitor_socket(HANDSHAKE_FAILED)
        try:
            sock.connect(endpoint)
            yield sock, monitor
        finally:
            sock.disable_monitor()
            trio.lowlevel.notify_closing(monitor.getsockopt(zmq.FD))  # type: ignore[arg-type]
            monitor.close(linger=0)


async def _failed_once(monitor: zmq.Socket[bytes]) -> bool:
    """Whether the rogue's socket sees a handshake fail within ``WAIT_S``."""
    with trio.move_on_after(WAIT_S):
        while True:
            for frames in await recv_batch(monitor):
                if handshake_failure(frames) is not None:
                    return True
    return False


async def rogue_agent(target: Target, cfg: ChaosConfig) -> Figures:
    """Rogue agents against the CURVE-protected link (see the module docstring)."""
    if not target.agent_endpoint:
        raise ChaosError("the coordinator does not report its agent endpoint (/api/v1/nodes)")
    if not target.agent_curve_key:
        raise ChaosError("the agent link is plaintext (start the fleet with --curve-keys)")
    nodes = [n for n in (await target.get("/api/v1/nodes"))["nodes"] if not n["lost"]]
    if not nodes:
        raise ChaosError("no live node")
    engines = await target.settle()
    spec = load_spec(target, cfg, "rogue-agent")
    frames = [codec.encode(m) for m in rogue_messages(nodes[0]["id"], engines[0]["id"],
                                                      target.model)]  # fmt: skip
    crew = rogues(nodes[0]["id"], target.agent_curve_key.encode())

    async def rejected() -> dict[str, float]:
        return by_label(await target.metrics(), "fleet_link_rejected_total", "reason")

    async def registers() -> float:
        metrics = await target.metrics()
        return total(metrics, "fleet_link_messages_total", type="Register")

    before, registers_before = await rejected(), await registers()
    want = {"curve_handshake": 3.0, "curve_key": 1.0}  # plaintext ×2, other key; unauthorized
    async with background(target.url, spec, run_clock()) as load:
        await trio.sleep(cfg.warmup_s)
        with contextlib.ExitStack() as stack:
            opened = [stack.enter_context(_socket(r, target.agent_endpoint)) for r in crew]
            queued = sum(send_nowait(sock, f) for sock, _ in opened for f in frames)
            seen = [await _failed_once(monitor) for _, monitor in opened]
            with trio.move_on_after(WAIT_S):
                while True:
                    after = await rejected()
                    if all(after.get(k, 0) - before.get(k, 0) >= n for k, n in want.items()):
                        break
                    await trio.sleep(0.1)
            await trio.sleep(HOLD_S)
        await trio.sleep(cfg.tail_s)
    after = await rejected()
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}
    curve_reasons = {"curve_handshake", "curve_key"}
    live = [n for n in (await target.get("/api/v1/nodes"))["nodes"] if not n["lost"]]
    all_engines = (await target.get("/api/v1/engines"))["engines"]
    indexed = (await target.http.get(f"{target.url}/api/v1/cache/pod/{ROGUE}-0")).status_code
    return {
        **figures(load.records),
        "detect_s": None,
        "recover_s": None,
        "rogues": len(crew),
        "messages_queued": queued,
        "refused_handshake": delta.get("curve_handshake", 0),
        "refused_key": delta.get("curve_key", 0),
        "rogues_saw_failure": sum(seen),
        "checks": {
            "every rogue refused and counted": all(delta.get(k, 0) >= n for k, n in want.items()),
            "every rogue saw its handshake fail": all(seen),
            "no rogue frame decoded": not any(delta.get(k) for k in set(delta) - curve_reasons)
            and await registers() == registers_before,
            "no rogue node": all(n["id"] != ROGUE for n in live),
            "no rogue engine": all(e["node"] != ROGUE for e in all_engines),
            "no rogue KV batch indexed": indexed == 404,
            "node still live": len(live) == len(nodes),
            "engines still ready": all(e["state"] == "ready" for e in await target.engines()),
        },
    }


__all__ = ["ROGUE", "Rogue", "rogue_agent", "rogue_messages", "rogues"]
