"""Who may speak on the agent link: CURVE on the ROUTER, a ZAP handler, refusals counted.

With ``--curve-keys`` the link's ROUTER is a CURVE server (:func:`fleet.protocol.curve.serve_curve`)
and libzmq asks this module's ZAP handler about every client's public key before a single frame
of it is read: only the keys of the folder's ``*.key`` files get in. The folder is read again
every ``reload_s`` (a Kubernetes Secret's mounted files change in place), so adding an agent key
needs no restart; removing one refuses its next connection (a link already up stays: CURVE
authenticates at the handshake; restart the coordinator to cut it).

Why our own ZAP handler and not pyzmq's ``zmq.auth`` authenticators: the thread one is a thread
that nobody's nursery owns and the asyncio one needs asyncio; the ZAP protocol is eight frames
in, six out, so a ROUTER read by a trio task in the link's own nursery (and its own ZMQ context,
so that each link has its handler) does it, with the decision a plain function
(:class:`LinkGate`) tested without sockets.

Every refusal is counted in ``fleet_link_rejected_total``: ``reason="curve_key"`` (a CURVE client
whose key is not authorized; ZAP refused it), ``reason="curve_handshake"`` (the handshake failed:
a plaintext peer, a client holding another coordinator's key, a forged box; seen on the ROUTER's
monitor socket). The log says so too, at most once per ``log_every_s`` per reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import trio
import zmq
import zmq.utils.z85

from fleet.protocol.curve import (
    HANDSHAKE_FAILED,
    ServerKeys,
    authorized_keys,
    handshake_failure,
    serve_curve,
)
from fleet.protocol.errors import ConfigError
from fleet.protocol.zmqio import open_socket, recv_batch, send_nowait

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by the ZAP specification (RFC 27)
CURVE_KEY = "curve_key"
CURVE_HANDSHAKE = "curve_handshake"


@dataclass(frozen=True)
class Decision:
    """A ZAP request answered.

    Attributes:
        reply: the frames to send back (routing envelope included).
        refused: None when let in; else why, for a log line.
        address: the peer's address, as libzmq gave it.
    """

    reply: list[bytes]
    refused: str | None
    address: str


class LinkGate:
    """Answers ZAP requests from the set of authorized keys (sans-I/O).

    Args:
        allowed: raw 32-byte public key → its file's name (:func:`authorized_keys`).
    """

    def __init__(self, allowed: dict[bytes, str]) -> None:
        self.allowed = dict(allowed)

    def replace(self, allowed: dict[bytes, str]) -> tuple[list[str], list[str]]:
        """Take a new set of keys; the file names added and removed."""
        old, self.allowed = self.allowed, dict(allowed)
        added = sorted(name for key, name in self.allowed.items() if key not in old)
        removed = sorted(name for key, name in old.items() if key not in self.allowed)
        return added, removed

    def decide(self, frames: list[bytes]) -> Decision | None:
        """The answer to one ZAP request (``[routing id, b"", "1.0", request id, domain,
        address, identity, mechanism, credentials...]``); None when it is no ZAP request."""
        if len(frames) < 8 or frames[1] != b"" or frames[2] != b"1.0":
            return None
        envelope, request_id, address = frames[:2], frames[3], frames[5]
        mechanism, credentials = frames[7], frames[8:]
        where = address.decode(errors="replace")

        def reply(code: bytes, text: str, user: bytes = b"") -> list[bytes]:
            return [*envelope, b"1.0", request_id, code, text.encode(), user, b""]

        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            why = f"mechanism {mechanism.decode(errors='replace')!r} is not CURVE"
            return Decision(reply(b"400", why), why, where)
        key = credentials[0]
        name = self.allowed.get(key)
        if name is None:
            z85 = zmq.utils.z85.encode(key).decode()
            why = f"public key {z85} is not among the authorized keys"
            return Decision(reply(b"400", "key not authorized"), why, where)
        return Decision(reply(b"200", "OK", name.encode()), None, where)


class LogThrottle:
    """At most one log line per ``every_s`` per reason (sans-I/O)."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def allow(self, reason: str, now: float) -> int | None:
        """None: stay quiet; else log, and this many were kept quiet since the last line."""
        last = self._last.get(reason)
        if last is not None and now - last < self.every_s:
            self._quiet[reason] = self._quiet.get(reason, 0) + 1
            return None
        self._last[reason] = now
        return self._quiet.pop(reason, 0)


class LinkGuard:
    """CURVE for the agent link's ROUTER: the ZAP handler, the key folder's reload and the
    handshake monitor.

    Owns the ZAP socket (:meth:`run` binds it in the link's context, reports ``started()``,
    and serves until cancelled) and the monitor socket :meth:`protect` attaches (read in the
    nursery it is given, closed when that task ends).

    Args:
        keys: the coordinator's keys and folder.
        count: adds one refusal by reason (``fleet_link_rejected_total``).
        reload_s: how often the folder is read again.
        log_every_s: at most one refusal line this often per reason.
    """

    def __init__(
        self,
        keys: ServerKeys,
        count: Callable[[str], None],
        *,
        reload_s: float = 5.0,
        log_every_s: float = 10.0,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.keys = keys
        self.gate = LinkGate(authorized_keys(keys))
        self.count = count
        self.reload_s = reload_s
        self.clock = clock
        self._throttle = LogThrottle(log_every_s)

    async def run(
        self, ctx: zmq.Context[zmq.Socket[bytes]], *, task_status: trio.TaskStatus[None]
    ) -> None:
        """Bind the ZAP handler in ``ctx``, then answer requests and reload keys until
        cancelled. Start it before the ROUTER binds, and stop it after the ROUTER is closed."""
        with open_socket(ctx, zmq.ROUTER) as zap:
            zap.bind(ZAP_ENDPOINT)
            log.info("agent link: CURVE, %d authorized agent key(s) in %s (%s)",
                     len(self.gate.allowed), self.keys.folder,
                     ", ".join(sorted(self.gate.allowed.values())) or "none")  # fmt: skip
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reload)
                task_status.started()
                while True:
                    for frames in await recv_batch(zap):
                        self._answer(zap, frames)

    def protect(self, sock: zmq.Socket[bytes], nursery: trio.Nursery) -> None:
        """Make ``sock`` (not bound yet) a CURVE server, and watch its failed handshakes in
        a task in ``nursery``."""
        serve_curve(sock, self.keys)
        monitor: zmq.Socket[bytes] = sock.get_monitor_socket(HANDSHAKE_FAILED)
        nursery.start_soon(self._watch, sock, monitor, name="agent link handshake monitor")

    def _answer(self, zap: zmq.Socket[bytes], frames: list[bytes]) -> None:
        decision = self.gate.decide(frames)
        if decision is None:
            log.warning("agent link: not a ZAP request (%d frames): ignored", len(frames))
            return
        send_nowait(zap, decision.reply)
        if decision.refused is not None:
            self._refused(CURVE_KEY, f"{decision.address}: {decision.refused}")

    def _refused(self, reason: str, detail: str) -> None:
        self.count(reason)
        quiet = self._throttle.allow(reason, self.clock())
        if quiet is not None:
            more = f" ({quiet} more refused since the last line)" if quiet else ""
            log.warning("agent link refused a connection (%s): %s%s", reason, detail, more)

    async def _watch(self, sock: zmq.Socket[bytes], monitor: zmq.Socket[bytes]) -> None:
        try:
            while True:
                for frames in await recv_batch(monitor):
                    failure = handshake_failure(frames)
                    if failure is not None and not failure.auth:  # ZAP counted refused keys
                        self._refused(CURVE_HANDSHAKE, failure.why)
        finally:
            if not sock.closed:
                sock.disable_monitor()
            trio.lowlevel.notify_closing(monitor.getsockopt(zmq.FD))  # type: ignore[arg-type]
            monitor.close(linger=0)

    async def _reload(self) -> None:
        while True:
            await trio.sleep(self.reload_s)
            try:
                allowed = await trio.to_thread.run_sync(authorized_keys, self.keys)
            except ConfigError as exc:
                log.warning("agent link: keeping the authorized keys as they were: %s", exc)
                continue
            added, removed = self.gate.replace(allowed)
            if added or removed:
                log.warning("agent link: authorized agent keys now %s (added %s, removed %s)",
                            sorted(allowed.values()), added, removed)  # fmt: skip


__all__ = ["CURVE_HANDSHAKE", "CURVE_KEY", "Decision", "LinkGate", "LinkGuard", "LogThrottle"]
