"""``fleet config``: the contexts file (its format and precedence: :mod:`fleet.clicontexts`).

::

    fleet config get-contexts [-o json|yaml]     the contexts; * marks the current one
    fleet config current-context                 its name
    fleet config use-context NAME                make NAME the current context
    fleet config set-context NAME --coordinator URL [--admin-key-file PATH]
    fleet config delete-context NAME
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import yaml

from fleet import cliout
from fleet.cliconn import NotFound
from fleet.clicontexts import (
    Context,
    Contexts,
    check_url,
    contexts_path,
    parse_contexts,
    to_document,
)
from fleet.protocol.errors import ConfigError


def add_parser(sub: Any) -> None:
    """Add ``fleet config`` and its commands to the ``fleet`` subparsers."""
    config = sub.add_parser("config", help="contexts: where the CLI connects (contexts.yaml)")
    csub = config.add_subparsers(dest="config_cmd", required=True, metavar="COMMAND")
    get = csub.add_parser("get-contexts", help="list the contexts (* marks the current one)")
    cliout.add_output_args(get, watch=False)
    get.set_defaults(func=_get_contexts)
    current = csub.add_parser("current-context", help="print the current context's name")
    current.set_defaults(func=_current_context)
    use = csub.add_parser("use-context", help="make NAME the current context")
    use.add_argument("name", metavar="NAME")
    use.set_defaults(func=_use_context)
    put = csub.add_parser("set-context", help="create or change the context NAME")
    put.add_argument("name", metavar="NAME")
    put.add_argument("--coordinator", required=True, metavar="URL", help="its coordinator URL")
    put.add_argument(
        "--admin-key-file",
        default=None,
        metavar="PATH",
        help="a file holding its admin key (kept as a path; the key is read when used)",
    )
    put.set_defaults(func=_set_context)
    drop = csub.add_parser("delete-context", help="remove the context NAME")
    drop.add_argument("name", metavar="NAME")
    drop.set_defaults(func=_delete_context)


def load(path: Path) -> Contexts:
    """The contexts file at ``path`` (none there: no contexts).

    Raises:
        ConfigError: unreadable, not YAML, or not a valid contexts file.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Contexts()
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot be read: {exc.strerror}") from exc
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), "", f"is not YAML: {exc}") from exc
    return parse_contexts(doc, str(path))


def save(path: Path, contexts: Contexts) -> None:
    """Write ``contexts`` to ``path`` atomically (mode 0600: it names key files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_document(contexts), f, sort_keys=False)
    tmp.replace(path)


def _path() -> Path:
    return contexts_path(os.environ)


def _get_contexts(args: argparse.Namespace) -> int:
    contexts = load(_path())
    data = {
        "current": contexts.current or None,
        "contexts": [
            {"name": n, "coordinator": c.coordinator, "adminKeyFile": c.admin_key_file or None}
            for n, c in sorted(contexts.contexts.items())
        ],
    }

    def render(data: dict[str, Any], wide: bool) -> Any:
        rows = [
            ["*" if c["name"] == data["current"] else "", c["name"], c["coordinator"],
             cliout.cell(c["adminKeyFile"])]
            for c in data["contexts"]
        ]  # fmt: skip
        return cliout.table(["current", "name", "coordinator", "admin key file"], rows)

    return cliout.show(args, lambda: data, render)


def _current_context(args: argparse.Namespace) -> int:
    contexts = load(_path())
    if not contexts.current:
        raise NotFound(f"no current context in {_path()} (`fleet config use-context NAME`)")
    print(contexts.current)
    return 0


def _use_context(args: argparse.Namespace) -> int:
    path = _path()
    contexts = load(path)
    if args.name not in contexts.contexts:
        known = ", ".join(sorted(contexts.contexts)) or "none"
        raise NotFound(f"no context named {args.name} in {path} (known: {known})")
    save(path, Contexts(contexts.contexts, args.name))
    print(f"switched to context {args.name} ({contexts.contexts[args.name].coordinator})")
    return 0


def _set_context(args: argparse.Namespace) -> int:
    path = _path()
    contexts = load(path)
    old = contexts.contexts.get(args.name)
    key_file = args.admin_key_file
    if key_file is None:
        key_file = old.admin_key_file if old is not None else ""
    entry = Context(check_url(args.coordinator, "--coordinator"), key_file)
    entries = {**contexts.contexts, args.name: entry}
    save(path, Contexts(entries, contexts.current or args.name))
    print(f"context {args.name} {'changed' if old else 'created'} in {path}")
    return 0


def _delete_context(args: argparse.Namespace) -> int:
    path = _path()
    contexts = load(path)
    if args.name not in contexts.contexts:
        raise NotFound(f"no context named {args.name} in {path}")
    entries = {n: c for n, c in contexts.contexts.items() if n != args.name}
    save(path, Contexts(entries, "" if contexts.current == args.name else contexts.current))
    print(f"context {args.name} deleted")
    return 0


__all__ = ["add_parser", "load", "save"]
