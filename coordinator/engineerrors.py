"""The engine client's errors (:mod:`.engineclient`) and its engine URLs.

Errors, with the ``reason`` the proxy files them under (:class:`~.errors.UpstreamError`)::

    FleetError (fleet.protocol.errors)
    └── EngineHTTPError          an exchange with an engine failed        reason
        ├── EngineConnectError   no connection: refused, unreachable      refused
        ├── EngineTimeout        connect, write, read or pool wait ran out timeout
        └── EngineBroken         reset, closed early, malformed HTTP      connect
    EngineURLError (ValueError)  the base URL is not ``http://host:port``
"""

from __future__ import annotations

from urllib.parse import urlsplit

from fleet.protocol.errors import FleetError


class EngineHTTPError(FleetError):
    """Raised when an HTTP exchange with an engine fails; the subclass (and ``reason``) say how."""

    reason = "connect"


class EngineConnectError(EngineHTTPError):
    """Raised when no connection to the engine could be opened (refused, unreachable,
    unresolvable): nothing listens there, the engine is gone."""

    reason = "refused"


class EngineTimeout(EngineHTTPError):
    """Raised when a phase of the exchange ran past its timeout.

    Args:
        phase: ``connect``, ``write``, ``read`` or ``pool``.
        timeout_s: the timeout that ran out.
    """

    reason = "timeout"

    def __init__(self, phase: str, timeout_s: float) -> None:
        super().__init__(f"{phase} timed out after {timeout_s:g} s")
        self.phase = phase


class EngineBroken(EngineHTTPError):
    """Raised when the connection broke (reset, closed before the response ended) or the
    engine's HTTP was malformed."""


class EngineURLError(ValueError):
    """Raised when an engine base URL is not ``http://host:port``."""


def parse_base_url(url: str) -> tuple[str, int]:
    """``(host, port)`` of an ``http://host:port`` URL (a trailing ``/`` is allowed).

    Raises:
        EngineURLError: another scheme, a path, query, fragment or credentials, or no host.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise EngineURLError(f"engine URL {url!r} is not http://host:port: {exc}") from exc
    if (
        parts.scheme != "http"
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        raise EngineURLError(
            f"engine URL {url!r} is not http://host:port (plain HTTP, no path, no credentials)"
        )
    return parts.hostname, port if port is not None else 80


__all__ = [
    "EngineBroken",
    "EngineConnectError",
    "EngineHTTPError",
    "EngineTimeout",
    "EngineURLError",
    "parse_base_url",
]
