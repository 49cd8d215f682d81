"""The SSRF perimeter of a split: which prefill engine a client may name, and what it may not send.

``x-prefiller-host-port`` (llm-d's routing-sidecar header: ``host:port``, or a comma list whose
first entry is used) names the prefill engine of a request. Fleet honours it only when every
entry is, character for character, the ``host:port`` of an engine the registry lists with role
``prefill`` for the requested model. Nothing is normalized or resolved, so metadata addresses
(``169.254.169.254``), loopback and other ports, DNS names, IPv6 forms (``[::1]``,
``::ffff:127.0.0.1``), userinfo (``a@host``), percent-encoding and whitespace all fail, with a
403 in OpenAI's error shape, counted in ``fleet_ssrf_blocked_total{reason}``. (llm-d's sidecar,
with ``--enable-ssrf-protection``, allows any port of an InferencePool's pod; Fleet also checks
the port and the role.)

A client body carrying ``kv_transfer_params`` is refused the same way: those name the host and
port the decode engine's KV connector connects to, so only Fleet's own split sets them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from .errors import ApiError
from .registry import EngineView

PREFILLER_HEADER = "x-prefiller-host-port"
#: ``fleet_ssrf_blocked_total`` reasons: malformed (not a bare host:port), not_prefill (a
#: registered engine, but not a prefill engine of the model), unknown (no engine has it),
#: kv_transfer_params (set by the client).
BLOCK_REASONS = ("malformed", "not_prefill", "unknown", "kv_transfer_params")


class Forbidden(ApiError):
    """Raised when a request names a prefill engine or KV source it may not (403).

    Attributes:
        reason: one of :data:`BLOCK_REASONS`.
    """

    status = 403
    type = "permission_error"

    def __init__(self, message: str, *, param: str, reason: str) -> None:
        super().__init__(message, param=param, code="forbidden")
        self.reason = reason


def host_port(url: str) -> str:
    """The ``host:port`` of an engine's URL, as written in it (``[v6]:port`` for IPv6)."""
    return urlsplit(url).netloc


def prefiller_of(
    headers: Mapping[str, str], model: str, engines: Iterable[EngineView]
) -> EngineView | None:
    """The prefill engine ``x-prefiller-host-port`` names (None without the header).

    Args:
        headers: the request's headers, lower-case names.
        model: the requested model.
        engines: every registered engine.

    Raises:
        Forbidden: an entry is not exactly the host:port of a prefill engine of ``model``.
    """
    value = headers.get(PREFILLER_HEADER)
    if value is None:
        return None
    prefill: dict[str, EngineView] = {}
    other: set[str] = set()
    for engine in engines:
        address = host_port(engine.url)
        if engine.model == model and engine.role == "prefill":
            prefill[address] = engine
        else:
            other.add(address)
    entries = value.split(",")
    for entry in entries:
        if entry not in prefill:
            reason = (
                "malformed" if not _bare(entry) else "not_prefill" if entry in other else "unknown"
            )
            raise Forbidden(
                f"`{PREFILLER_HEADER}` must name a prefill engine of `{model}` by its exact "
                f"host:port; {entry[:64]!r} is not one.",
                param=PREFILLER_HEADER,
                reason=reason,
            )
    return prefill[entries[0]]


def check_body(body: Mapping[str, Any]) -> None:
    """Refuse a client's ``kv_transfer_params``.

    Raises:
        Forbidden: the body has ``kv_transfer_params`` (even null: only Fleet's split sets it).
    """
    if "kv_transfer_params" in body:
        raise Forbidden(
            "`kv_transfer_params` is set by the gateway's prefill/decode split, not by clients.",
            param="kv_transfer_params",
            reason="kv_transfer_params",
        )


def _bare(entry: str) -> bool:
    """Whether ``entry`` looks like a bare ``name-or-ipv4:port`` (for the metric's reason)."""
    host, sep, port = entry.rpartition(":")
    return bool(
        sep
        and host
        and port.isascii()
        and port.isdigit()
        and all(c.isascii() and (c.isalnum() or c in ".-") for c in host)
    )


__all__ = [
    "BLOCK_REASONS",
    "PREFILLER_HEADER",
    "Forbidden",
    "check_body",
    "host_port",
    "prefiller_of",
]
