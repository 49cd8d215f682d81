"""The front HTTP server's decisions, without I/O: which server takes a request, how long a
connection may take to send one, and whether it is kept after a response.

The front server (:mod:`.fastserve`) reads a request line before it parses anything else. A
``POST`` to one of its own paths (the inference routes) it serves itself; anything else (another
method or path, a query it does not expect, an HTTP/2 preface, a line it cannot read) goes,
with its connection, to hypercorn, which answers it exactly as it did before the front server
existed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from fleet.protocol.errors import ConfigError

Route = Literal["front", "hypercorn"]
VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")


@dataclass(frozen=True)
class FrontLimits:
    """The front server's limits, with units.

    Args:
        max_body_bytes: a larger request body is answered 413 and its connection closed.
        body_timeout_s: the whole body must arrive within this (408 otherwise).
        keep_alive_s: an idle connection (no byte of a next request) is closed after this.
        header_timeout_s: a request's line and headers must arrive within this of their first
            byte (slowloris); the connection is answered 408 and closed otherwise.
        max_header_bytes: a request line plus headers larger than this is answered 431.

    Raises:
        ConfigError: a limit that is not a positive number.
    """

    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout_s: float = 60.0
    keep_alive_s: float = 75.0
    header_timeout_s: float = 10.0
    max_header_bytes: int = 16 * 1024

    def __post_init__(self) -> None:
        for key in ("body_timeout_s", "keep_alive_s", "header_timeout_s"):
            value = getattr(self, key)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(key, value, "must be a positive number of seconds")
        for key in ("max_body_bytes", "max_header_bytes"):
            if not getattr(self, key) >= 1:
                raise ConfigError(key, getattr(self, key), "must be >= 1")


def classify(buffered: bytes, paths: frozenset[bytes], max_line: int) -> Route | None:
    """Who serves the request that starts ``buffered``: ``"front"`` for ``POST`` to one of
    ``paths`` (a query string allowed) in HTTP/1.x, ``"hypercorn"`` for anything else, ``None``
    while its request line is incomplete (and shorter than ``max_line`` bytes)."""
    end = buffered.find(b"\n")
    if end < 0:
        return None if len(buffered) < max_line else "hypercorn"
    if not buffered.startswith(b"POST "):
        return "hypercorn"
    target, _, version = buffered[5:end].rstrip(b"\r").partition(b" ")
    path = target.partition(b"?")[0]
    return "front" if path in paths and version in VERSIONS else "hypercorn"


def head_deadline(*, last_active: float, started: float | None, limits: FrontLimits) -> float:
    """When waiting for a request's head ends: ``keep_alive_s`` after the connection was last
    active (opened, or its last response sent) while no byte of the request came (``started``
    is None), else ``header_timeout_s`` after its first byte came (``started``)."""
    if started is None:
        return last_active + limits.keep_alive_s
    return started + limits.header_timeout_s


#: Sweeps of the plain connections' waits per shortest head timeout (:func:`sweep_every`).
SWEEPS = 10


def sweep_every(limits: FrontLimits) -> float:
    """How often the plain connections' waits for a request's head are swept: a tenth of the
    shorter of ``keep_alive_s`` and ``header_timeout_s`` (a wait ends within that of its
    deadline)."""
    return min(limits.keep_alive_s, limits.header_timeout_s) / SWEEPS


def wait_ends(*, until: float, idle: bool, now: float, terminated: bool) -> bool:
    """Whether a wait for a request's head ends now: its deadline ``until`` passed, or it is
    ``idle`` (no byte of a request yet) and the server's drain ended."""
    return now >= until or (idle and terminated)


def keep_open(*, our_done: bool, their_done: bool, peer_closed: bool, closing: bool) -> bool:
    """Whether a connection serves another request after a response: only when both sides
    finished their message (a body left unread would be parsed as the next request), the
    client is still there, and the server is not draining."""
    return our_done and their_done and not peer_closed and not closing


__all__ = [
    "SWEEPS",
    "FrontLimits",
    "Route",
    "classify",
    "head_deadline",
    "keep_open",
    "sweep_every",
    "wait_ends",
]
