"""``malformed-wire``: garbage on Fleet's ZMQ ports, beside a good load that must not notice.

Two listeners take frames from outside the process:

- the coordinator's agent link (a ROUTER; ``/api/v1/nodes`` reports its endpoint): a DEALER
  sends frame sets that are not messages (wrong frame count, header, msgpack, type, fields;
  truncated; a stranger claiming to be a known node). Each must be counted in
  ``fleet_link_rejected_total`` and change nothing: the node stays live, its engines ready;
- each engine's KV relay in the agent (a SUB the engine's publisher connects to; the engine's
  ``/kv_event_sources`` names it): a PUB connects and sends frames that are not vLLM KV batches.
  Each must be counted in ``fleet_agent_kv_rejected_total{engine}``, and that engine's KV events
  must still reach the index afterwards.

Nothing sent here decodes as a valid message: a valid one would be a different test (forged
state), not garbage.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import trio
import zmq

from fleet.protocol import codec
from fleet.protocol.messages import Heartbeat, KVEventBatch
from fleet.protocol.zmqio import open_socket, recv_batch, send_nowait

from .errors import ChaosError
from .load import background, run_clock
from .outcomes import figures
from .scenarios import ChaosConfig, Figures, load_spec
from .target import Target, get_json, scrape, total

STRANGER = b"chaos-stranger"
RELAYS = 2  # engines whose KV relay gets garbage
COUNT_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 5.0


def link_frames(known_node: str) -> dict[str, list[bytes]]:
    """Frame sets for the agent link (after the routing id), none a valid message."""
    beat = codec.encode(Heartbeat(node_id=STRANGER.decode(), seq=1, healthy=True))
    impostor = codec.encode(Heartbeat(node_id=known_node, seq=10**6, healthy=False))
    kv = codec.encode(KVEventBatch(node_id=STRANGER.decode(), engine_id="ghost", seq=0, ts=0.0))
    header = codec.HEADER
    return {
        "one frame": [b"garbage"],
        "three frames": [header, beat[1], b"extra"],
        "wrong header": [b"fleet/999", beat[1]],
        "empty payload": [header, b""],
        "not msgpack": [header, b"\xc1\xc1\xc1\xc1"],
        "truncated msgpack": [header, beat[1][: len(beat[1]) // 2]],
        "msgpack list": [header, msgpack.packb([1, 2, 3])],
        "unknown type": [header, msgpack.packb({"type": "Bogus", "node_id": "x"})],
        "field of wrong type": [header, msgpack.packb({"type": "Heartbeat", "node_id": 5})],
        "1 MiB of noise": [header, bytes(range(256)) * 4096],
        "impostor of a known node": impostor,
        "KV batch for an unknown engine": kv,
    }


def relay_frames() -> dict[str, list[bytes]]:
    """Frame sets for a KV relay's SUB socket, none a valid vLLM KV batch."""
    seq = struct.pack(">q", 1)
    batch = msgpack.packb([1.0, [["BlockStored", [1, 2], None, [1] * 64, 32, None]], 0])
    return {
        "one frame": [b"garbage"],
        "four frames": [b"kv", seq, batch, b"extra"],
        "sequence of 3 bytes": [b"kv", b"\x00\x00\x01", batch],
        "not msgpack": [b"kv", seq, b"\xc1\xc1"],
        "truncated batch": [b"kv", seq, batch[: len(batch) // 2]],
        "not a batch": [b"kv", seq, msgpack.packb({"a": 1})],
        "topic not UTF-8": [b"\xff\xfe", seq, batch[: len(batch) // 2]],
    }


@contextlib.asynccontextmanager
async def _connected(
    kind: int, endpoint: str, identity: bytes = b""
) -> AsyncIterator[zmq.Socket[bytes]]:
    """A ZMQ socket connected to ``endpoint``, yielded once its handshake with the peer is done
    (closed, linger 0, on the way out).

    Raises:
        ChaosError: no handshake within ``CONNECT_TIMEOUT_S``.
    """
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    with open_socket(ctx, kind) as sock:
        if identity:
            sock.setsockopt(zmq.ROUTING_ID, identity)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        try:
            sock.connect(endpoint)
            with trio.move_on_after(CONNECT_TIMEOUT_S) as waited:
                await recv_batch(monitor)
        finally:
            sock.disable_monitor()
            trio.lowlevel.notify_closing(monitor.getsockopt(zmq.FD))  # type: ignore[arg-type]
            monitor.close(linger=0)
        if waited.cancelled_caught:
            raise ChaosError(f"no ZMQ handshake with {endpoint} within {CONNECT_TIMEOUT_S:g} s")
        yield sock


def _send_all(sock: zmq.Socket[bytes], frame_sets: dict[str, list[bytes]]) -> int:
    """Send every frame set without blocking; how many went out."""
    return sum(send_nowait(sock, frames) for frames in frame_sets.values())


async def _wait_count(read: Any, want: float) -> float:
    """Poll ``read()`` until it reaches ``want`` or the time is up; its last value."""
    value = await read()
    with trio.move_on_after(COUNT_TIMEOUT_S):
        while value < want:
            await trio.sleep(0.1)
            value = await read()
    return float(value)


async def malformed_wire(target: Target, cfg: ChaosConfig) -> Figures:
    """Garbage to the agent link and to KV relays (see the module docstring)."""
    if not target.agent_endpoint:
        raise ChaosError("the coordinator does not report its agent endpoint (/api/v1/nodes)")
    if target.agent_curve_key:
        raise ChaosError(
            "the agent link is CURVE-protected: garbage cannot reach its decoder "
            "without the key (rogue-agent is the scenario for such a fleet)"
        )
    nodes = [n for n in (await target.get("/api/v1/nodes"))["nodes"] if not n["lost"]]
    if not nodes:
        raise ChaosError("no live node")
    engines = await target.settle()
    spec = load_spec(target, cfg, "malformed-wire")
    link = link_frames(nodes[0]["id"])
    relay = relay_frames()
    victims = engines[:RELAYS]

    async def link_rejected() -> float:
        return total(await target.metrics(), "fleet_link_rejected_total")

    async def relay_rejected() -> float:
        values = 0.0
        for node in nodes:
            metrics = await scrape(target.http, node["agent_url"] + "/metrics")
            values += sum(
                total(metrics, "fleet_agent_kv_rejected_total", engine=e["id"]) for e in victims
            )
        return values

    async def kv_batches(engine_id: str) -> float:
        return total(await target.metrics(), "fleet_kv_batches_total", engine=engine_id)

    link_before, relay_before = await link_rejected(), await relay_rejected()
    batches_before = {e["id"]: await kv_batches(e["id"]) for e in victims}
    async with background(target.url, spec, run_clock()) as load:
        await trio.sleep(cfg.warmup_s)
        async with contextlib.AsyncExitStack() as stack:
            sock = await stack.enter_async_context(
                _connected(zmq.DEALER, target.agent_endpoint, STRANGER)
            )
            link_sent = _send_all(sock, link)
            relay_sent = 0
            for engine in victims:
                sources = await get_json(target.http, engine["url"] + "/kv_event_sources")
                pub = await stack.enter_async_context(_connected(zmq.PUB, sources["0"]["endpoint"]))
                await trio.sleep(0.2)  # the SUB's subscription reaches the PUB after the handshake
                relay_sent += _send_all(pub, relay)
            link_after = await _wait_count(link_rejected, link_before + link_sent)
            relay_after = await _wait_count(relay_rejected, relay_before + relay_sent)
        await trio.sleep(cfg.tail_s)
    flowing = {e["id"]: await kv_batches(e["id"]) > batches_before[e["id"]] for e in victims}
    after_nodes = [n for n in (await target.get("/api/v1/nodes"))["nodes"] if not n["lost"]]
    after_engines = await target.engines()
    return {
        **figures(load.records),
        "detect_s": None,
        "recover_s": None,
        "link_frames_sent": link_sent,
        "link_rejected": link_after - link_before,
        "relay_frames_sent": relay_sent,
        "relay_rejected": relay_after - relay_before,
        "checks": {
            "every frame set sent": link_sent == len(link)
            and relay_sent == len(relay) * len(victims),
            "every link frame counted as rejected": link_after - link_before == link_sent,
            "every relay frame counted as rejected": relay_after - relay_before == relay_sent,
            "node still live": len(after_nodes) == len(nodes),
            "engines still ready": all(e["state"] == "ready" for e in after_engines),
            "KV events still flow from the relays hit": all(flowing.values()),
        },
    }


__all__ = ["link_frames", "malformed_wire", "relay_frames"]
