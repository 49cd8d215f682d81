"""Who may reach a coordinator's API: the rule for binding beyond loopback. Sans-I/O.

On loopback only this machine reaches the API, and Fleet serves it open (the demo, tests). A
coordinator that binds any other address must have an admin key (``/admin/*`` and the KV/cache
inspection routes) and API keys (the OpenAI routes), unless its operator says the API is meant
to be open (``--allow-open``, for a network that is private by other means).
"""

from __future__ import annotations

import ipaddress

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` reaches only this machine (``0.0.0.0``, ``::`` and names other
    than localhost do not)."""
    name = host.strip().strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def open_problem(host: str, *, admin_key: bool, api_keys: bool, allow_open: bool) -> str | None:
    """Why a coordinator may not serve on ``host`` as configured; None when it may."""
    if allow_open or is_loopback(host):
        return None
    missing = [flag for flag, given in (("--admin-key", admin_key), ("--api-keys", api_keys))
               if not given]  # fmt: skip
    if not missing:
        return None
    return (
        f"binding {host} serves beyond this machine: it needs {' and '.join(missing)} "
        "(or --allow-open, for a network private by other means)"
    )


__all__ = ["is_loopback", "open_problem"]
