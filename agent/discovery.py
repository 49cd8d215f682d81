"""Finding every coordinator behind one DNS name (a Kubernetes headless Service).

A headless Service (``clusterIP: None``) has one A/AAAA record per coordinator pod. The agent
resolves the name every ``interval_s`` and keeps one link per address: :func:`plan_links` is
the decision (sans-I/O: the links open now and the addresses resolved, in; links to open and
to close, out), :func:`follow_service` the trio loop that resolves and applies it.

A failed or empty resolution (DNS down, a timeout, no coordinator pod yet: a headless
Service with no endpoints answers NXDOMAIN) changes nothing: links are closed only when a
successful answer no longer names their address (a coordinator pod replaced or scaled away).
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Callable, Set
from dataclasses import dataclass

import trio

from fleet.protocol.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceAddress:
    """A DNS name and the agent-link port every address behind it listens on."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not self.host or len(self.host) > 253 or any(c in self.host for c in "/:[] "):
            raise ConfigError("coordinator_service", self.host, "must be a DNS name")
        if not 1 <= self.port <= 65535:
            raise ConfigError("coordinator_service", self.port, "port must be 1..65535")

    @classmethod
    def parse(cls, text: str) -> ServiceAddress:
        """``HOST:PORT``, e.g. ``fleet-coordinator-agents:5555``.

        Raises:
            ConfigError: no port, a port that is not a number, or a bad host.
        """
        host, sep, port = text.strip().rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigError("coordinator_service", text, "must be HOST:PORT")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class DiscoveryConfig:
    """How the agent follows a coordinator Service.

    Args:
        service: the name to resolve and the port to connect to.
        interval_s: time between two resolutions.
        timeout_s: the longest one resolution may take; past it, it counts as failed.
        max_links: the most coordinators linked at once (a name that resolves to a large
            Service by mistake opens no more).

    Raises:
        ConfigError: a key with a bad value.
    """

    service: ServiceAddress
    interval_s: float = 5.0
    timeout_s: float = 2.0
    max_links: int = 16

    def __post_init__(self) -> None:
        for key in ("interval_s", "timeout_s"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(key, value, "must be > 0")
        if self.max_links < 1:
            raise ConfigError("max_links", self.max_links, "must be >= 1")


@dataclass(frozen=True)
class LinkChanges:
    """Links to open and to close, each a sorted tuple of ZMQ endpoints."""

    open: tuple[str, ...] = ()
    close: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.open or self.close)


def plan_links(current: Set[str], resolved: Set[str] | None, *, max_links: int = 16) -> LinkChanges:
    """Which links to open and close so that they match the addresses ``resolved``.

    Args:
        current: endpoints of the links open now.
        resolved: endpoints the last resolution named; None (it failed) or empty changes
            nothing.
        max_links: the most links open afterwards; links kept come first, then new endpoints
            in sorted order.

    Returns:
        the changes: endpoints resolved and not linked are opened, links not resolved are
        closed.
    """
    if not resolved:
        return LinkChanges()
    close = tuple(sorted(current - resolved))
    room = max(max_links - len(current & resolved), 0)
    return LinkChanges(open=tuple(sorted(resolved - current))[:room], close=close)


def zmq_endpoint(address: str, port: int) -> str:
    """The ZMQ TCP endpoint of an IP address (IPv6 in brackets)."""
    return f"tcp://[{address}]:{port}" if ":" in address else f"tcp://{address}:{port}"


async def resolve_service(service: ServiceAddress, timeout_s: float) -> frozenset[str] | None:
    """The ZMQ endpoints of every address ``service`` resolves to; None if the lookup failed
    or took longer than ``timeout_s``.

    The lookup is trio's :func:`trio.socket.getaddrinfo`: the system's resolver in a worker
    thread, or the one :func:`trio.socket.set_custom_hostname_resolver` installed (tests).
    """
    with trio.move_on_after(timeout_s):
        try:
            infos = await trio.socket.getaddrinfo(
                service.host, service.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
        except OSError as exc:  # socket.gaierror: NXDOMAIN, no resolver, ...
            log.info("resolving %s: %s", service, exc)
            return None
        return frozenset(zmq_endpoint(str(info[4][0]), service.port) for info in infos)
    log.warning("resolving %s took longer than %.1f s", service, timeout_s)
    return None


async def follow_service(
    cfg: DiscoveryConfig,
    current: Callable[[], frozenset[str]],
    apply: Callable[[LinkChanges], None],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Resolve ``cfg.service`` every ``cfg.interval_s`` and ``apply`` the changes
    :func:`plan_links` decides against the links ``current()`` reports.

    Reports ``started()`` after the first resolution (at most ``cfg.timeout_s``), so the links
    to the coordinators found then are open. Runs until cancelled; it owns nothing.
    """
    started = False
    while True:
        resolved = await resolve_service(cfg.service, cfg.timeout_s)
        changes = plan_links(current(), resolved, max_links=cfg.max_links)
        if resolved and len(resolved) > cfg.max_links and (changes or not started):
            log.warning("%s names %d coordinators; linking %d", cfg.service, len(resolved),
                        cfg.max_links)  # fmt: skip
        if changes:
            log.info("coordinators behind %s: open %s, close %s", cfg.service,
                     list(changes.open), list(changes.close))  # fmt: skip
            apply(changes)
        if not started:
            task_status.started()
            started = True
        await trio.sleep(cfg.interval_s)


__all__ = [
    "DiscoveryConfig",
    "LinkChanges",
    "ServiceAddress",
    "follow_service",
    "plan_links",
    "resolve_service",
    "zmq_endpoint",
]
