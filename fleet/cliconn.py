"""The CLI's calls to a coordinator or an agent, and the options that say where they go.

Every failure becomes one :class:`~fleet.protocol.errors.FleetError` with a one-line message
(``fleet`` prints it and exits 1): the server is unreachable, answered an error (its OpenAI
``error.message``), or answered something that is not Fleet's JSON.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from fleet import clicontexts
from fleet.protocol.errors import FleetError

DEFAULT_AGENT = "http://127.0.0.1:8081"


class NotFound(FleetError):
    """The fleet has no such thing (a 404, or a name missing from a listing)."""


def add_coordinator_args(p: argparse.ArgumentParser, *, admin: bool = True) -> None:
    """``--coordinator``, ``--context`` and (with ``admin``) ``--admin-key``; :func:`resolve`
    fills them in after parsing."""
    p.add_argument(
        "--coordinator",
        default=None,
        metavar="URL",
        help="coordinator URL (default: $FLEET_COORDINATOR, else the context's, else "
        f"{clicontexts.DEFAULT_COORDINATOR})",
    )
    p.add_argument(
        "--context",
        default=None,
        metavar="NAME",
        help="a context of the contexts file instead of its current one (`fleet config`)",
    )
    if admin:
        p.add_argument(
            "--admin-key",
            default=None,
            help="the coordinator's admin key (default: $FLEET_ADMIN_KEY, else the context's "
            "admin-key-file)",
        )
    p.set_defaults(resolve_target=True)


def resolve(args: argparse.Namespace) -> None:
    """Set ``args.coordinator`` and ``args.admin_key`` from the flags, the environment and the
    contexts file (:func:`fleet.clicontexts.resolve`).

    Raises:
        ConfigError: a bad URL, contexts file, or context name.
    """
    from fleet.cliconfig import load

    target = clicontexts.resolve(
        load(clicontexts.contexts_path(os.environ)),
        os.environ,
        coordinator=args.coordinator,
        admin_key=getattr(args, "admin_key", None),
        context=args.context,
        want_key=hasattr(args, "admin_key"),
    )
    args.coordinator, args.admin_key = target.coordinator, target.admin_key


def call(
    base: str,
    path: str,
    admin_key: str = "",
    body: Any = None,
    *,
    method: str | None = None,
    what: str = "coordinator",
    timeout_s: float = 10.0,
) -> Any:
    """``GET`` ``base + path`` (``POST`` when there is a ``body``, or ``method``); its JSON.

    Raises:
        NotFound: the server answered 404.
        FleetError: the server is unreachable, answered another error, or not JSON.
    """
    return answer(base, path, admin_key, body, method=method, what=what, timeout_s=timeout_s)[1]


def answer(
    base: str,
    path: str,
    admin_key: str = "",
    body: Any = None,
    *,
    method: str | None = None,
    what: str = "coordinator",
    timeout_s: float = 10.0,
) -> tuple[int, Any]:
    """:func:`call`, also returning the success status (a ``PUT`` answers 201 when it created
    the object, 200 when it replaced one).

    Raises:
        NotFound: the server answered 404.
        FleetError: the server is unreachable, answered another error, or not JSON.
    """
    import httpx

    url = base.rstrip("/") + path
    headers = {"authorization": f"Bearer {admin_key}"} if admin_key else {}
    method = method or ("GET" if body is None else "POST")
    try:
        response = httpx.request(method, url, json=body, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise FleetError(f"cannot reach the {what} at {base}: {reason}") from exc
    if response.status_code >= 300:
        message = _error_message(response)
        if response.status_code == 401:
            message += " (give --admin-key, $FLEET_ADMIN_KEY or a context's admin-key-file)"
        error = NotFound if response.status_code == 404 else FleetError
        raise error(f"{url}: {response.status_code}: {message}")
    try:
        return response.status_code, response.json()
    except ValueError as exc:
        raise FleetError(f"{url} did not answer JSON: is {base} a Fleet {what}?") from exc


def _error_message(response: Any) -> str:
    """The OpenAI error body's message; for any other body, the status's reason phrase."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        from http import HTTPStatus

        try:
            phrase = HTTPStatus(response.status_code).phrase
        except ValueError:
            phrase = "error"
        message = f"{phrase} (not a Fleet API answer)"
    return " ".join(str(message).split())


__all__ = ["DEFAULT_AGENT", "NotFound", "add_coordinator_args", "answer", "call", "resolve"]
