"""HTTP/1.1 only on Fleet's HTTP servers, as vLLM's own server (uvicorn + h11) speaks.

hypercorn switches a plain-text connection to HTTP/2 when it sees the prior-knowledge preface
(``PRI * HTTP/2.0``) or a bodiless ``Upgrade: h2c`` request. Its HTTP/2 path on trio can raise
out of the connection (``trio.BusyResourceError``: two tasks sending on one socket; seen with
sglang-router 0.3.2 in front of simulated engines), and an error out of one connection ends
hypercorn's whole server: one client could take an engine simulator, an agent or the
coordinator down. A real vLLM engine never speaks HTTP/2, so neither do Fleet's servers:
:func:`install` makes every hypercorn connection of this process HTTP/1.1. An ``Upgrade: h2c``
request is then answered in HTTP/1.1, as uvicorn does, and the HTTP/2 preface is read as an
HTTP/1.1 request (method ``PRI``, target ``*``) and answered in HTTP/1.1.

It replaces hypercorn's ``ProtocolWrapper`` in ``hypercorn.trio.tcp_server`` (the only place
that builds one for trio), hence the pinned hypercorn minor version in pyproject.toml.
"""

from __future__ import annotations

from typing import Any

import hypercorn.trio.tcp_server as _tcp_server
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h11 import H11Protocol


class H11OnlyProtocol(H11Protocol):
    """hypercorn's HTTP/1.1 protocol without the switch to HTTP/2."""

    async def _check_protocol(self, event: Any) -> None:
        return None  # never H2CProtocolRequiredError, never H2ProtocolAssumedError


class H11OnlyWrapper(ProtocolWrapper):
    """A connection that speaks HTTP/1.1 whatever the client offers (no TLS ALPN either)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.protocol = H11OnlyProtocol(
            self.app,
            self.config,
            self.context,
            self.task_group,
            self.state,
            self.ssl,
            self.client,
            self.server,
            self.send,
        )


def install() -> None:
    """Make this process's hypercorn connections HTTP/1.1 only (idempotent)."""
    _tcp_server.ProtocolWrapper = H11OnlyWrapper  # type: ignore[attr-defined]


__all__ = ["H11OnlyProtocol", "H11OnlyWrapper", "install"]
