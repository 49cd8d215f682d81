"""Where the CLI connects: the contexts file and the precedence of its settings.

The contexts file (``$FLEET_CONFIG``, default ``~/.config/fleet/contexts.yaml``)::

    current-context: prod
    contexts:
      local:
        coordinator: http://127.0.0.1:8080
      prod:                                  # through kubectl port-forward
        coordinator: http://127.0.0.1:18080
        admin-key-file: ~/.config/fleet/prod.key

A command's coordinator is, first found: ``--coordinator``, ``$FLEET_COORDINATOR``, the context
(``--context NAME``, else ``current-context``), ``http://127.0.0.1:8080``. Its admin key is
``--admin-key``, ``$FLEET_ADMIN_KEY``, or the context's ``admin-key-file`` (read only when the
coordinator is the context's own, so a key never goes to another server), else none.
Everything here is plain data in and out; :mod:`fleet.cliconfig` does the file I/O commands.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fleet.protocol.errors import ConfigError

DEFAULT_COORDINATOR = "http://127.0.0.1:8080"
_KEYS = ("coordinator", "admin-key-file")


@dataclass(frozen=True)
class Context:
    """One named place to connect to."""

    coordinator: str
    admin_key_file: str = ""


@dataclass(frozen=True)
class Contexts:
    """The contexts file's content: the contexts by name and the current one's name."""

    contexts: Mapping[str, Context] = field(default_factory=dict)
    current: str = ""


@dataclass(frozen=True)
class Target:
    """The coordinator a command talks to, its admin key, and where the URL came from
    (``flag``, ``env``, ``context NAME`` or ``default``)."""

    coordinator: str
    admin_key: str
    source: str


def contexts_path(env: Mapping[str, str]) -> Path:
    """``$FLEET_CONFIG``, else ``~/.config/fleet/contexts.yaml``."""
    given = env.get("FLEET_CONFIG", "")
    return Path(given).expanduser() if given else Path.home() / ".config/fleet/contexts.yaml"


def check_url(url: str, where: str) -> str:
    """``url`` without a trailing slash.

    Raises:
        ConfigError: not an http(s) URL with a host (``where`` names the field).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(where, url, "must be an http:// or https:// URL with a host")
    return url.rstrip("/")


def parse_contexts(doc: Any, source: str) -> Contexts:
    """The contexts of a loaded YAML document (None: an empty file).

    Raises:
        ConfigError: a wrong shape, an unknown key, a bad URL, or a current context that
            does not exist; the key is named with its path, e.g. ``contexts.prod.coordinator``.
    """
    if doc is None:
        return Contexts()
    if not isinstance(doc, dict):
        raise ConfigError(source, type(doc).__name__, "must be a mapping")
    unknown = sorted(set(doc) - {"current-context", "contexts"})
    if unknown:
        raise ConfigError(f"{source}: {unknown[0]}", doc[unknown[0]], "is not a known key")
    raw = doc.get("contexts") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: contexts", raw, "must map names to contexts")
    out: dict[str, Context] = {}
    for name, entry in raw.items():
        where = f"{source}: contexts.{name}"
        if not isinstance(entry, dict):
            raise ConfigError(where, entry, "must be a mapping with `coordinator`")
        extra = sorted(set(entry) - set(_KEYS))
        if extra:
            raise ConfigError(f"{where}.{extra[0]}", entry[extra[0]], "is not a known key")
        url = entry.get("coordinator")
        if not isinstance(url, str):
            raise ConfigError(f"{where}.coordinator", url, "must be a URL")
        key_file = entry.get("admin-key-file") or ""
        if not isinstance(key_file, str):
            raise ConfigError(f"{where}.admin-key-file", key_file, "must be a path")
        out[str(name)] = Context(check_url(url, f"{where}.coordinator"), key_file)
    current = doc.get("current-context") or ""
    if not isinstance(current, str) or (current and current not in out):
        raise ConfigError(f"{source}: current-context", current, "names no context")
    return Contexts(out, current)


def to_document(contexts: Contexts) -> dict[str, Any]:
    """The YAML document of ``contexts`` (what :func:`parse_contexts` reads back)."""
    entries: dict[str, Any] = {}
    for name, c in sorted(contexts.contexts.items()):
        entries[name] = {"coordinator": c.coordinator}
        if c.admin_key_file:
            entries[name]["admin-key-file"] = c.admin_key_file
    doc: dict[str, Any] = {"current-context": contexts.current} if contexts.current else {}
    return doc | {"contexts": entries}


def resolve(
    contexts: Contexts,
    env: Mapping[str, str],
    *,
    coordinator: str | None = None,
    admin_key: str | None = None,
    context: str | None = None,
    read_key: Any = None,
    want_key: bool = True,
) -> Target:
    """Where to connect, by the precedence flag > environment > context > default.

    Args:
        contexts: the contexts file's content.
        env: the environment (``FLEET_COORDINATOR``, ``FLEET_ADMIN_KEY``).
        coordinator: ``--coordinator``, if given.
        admin_key: ``--admin-key``, if given.
        context: ``--context``, if given (default: the current context).
        read_key: reads an admin key file (a path) to its key; default: the file's text,
            stripped.
        want_key: False for a command that sends no admin key: no key file is read.

    Raises:
        ConfigError: ``--context`` names no context, a URL is bad, or the context's key file
            cannot be read.
    """
    name = context or contexts.current
    chosen = contexts.contexts.get(name) if name else None
    if context and chosen is None:
        known = ", ".join(sorted(contexts.contexts)) or "none"
        raise ConfigError("--context", context, f"names no context (known: {known})")
    if coordinator:
        url, source = check_url(coordinator, "--coordinator"), "flag"
    elif env.get("FLEET_COORDINATOR"):
        url, source = check_url(env["FLEET_COORDINATOR"], "$FLEET_COORDINATOR"), "env"
    elif chosen is not None:
        url, source = chosen.coordinator, f"context {name}"
    else:
        url, source = DEFAULT_COORDINATOR, "default"
    if not want_key:
        key = ""
    elif admin_key is not None:
        key = admin_key
    elif env.get("FLEET_ADMIN_KEY"):
        key = env["FLEET_ADMIN_KEY"]
    elif chosen is not None and chosen.admin_key_file and url == chosen.coordinator:
        key = (read_key or _read_key)(chosen.admin_key_file, name)
    else:
        key = ""
    return Target(url, key, source)


def _read_key(path: str, context: str) -> str:
    try:
        return Path(os.path.expanduser(path)).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            f"contexts.{context}.admin-key-file", path, f"cannot be read: {exc.strerror}"
        ) from exc


__all__ = [
    "DEFAULT_COORDINATOR",
    "Context",
    "Contexts",
    "Target",
    "check_url",
    "contexts_path",
    "parse_contexts",
    "resolve",
    "to_document",
]
