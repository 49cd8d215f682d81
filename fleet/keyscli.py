"""``fleet keys generate DIR`` and the ``--curve-keys`` options of ``fleet coordinator``,
``fleet agent`` and ``fleet up`` (the agent link's CURVE keys: protocol/curve.py,
docs/SECURITY.md)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fleet.protocol.curve import (
    CLIENT,
    SERVER,
    ClientKeys,
    ServerKeys,
    curve_available,
    generate_keys,
    load_client_keys,
    load_server_keys,
)
from fleet.protocol.errors import ConfigError, FleetError

_HELP = {
    "coordinator": "encrypt the agent link and let in only authorized agents: DIR holds "
    "coordinator.key_secret and every agent public key (*.key) allowed; DIR/coordinator of "
    "`fleet keys generate DIR` (default: plaintext, for loopback and trusted networks)",
    "agent": "encrypt the links to the coordinators with CURVE: DIR holds this agent's "
    "*.key_secret and coordinator.key; DIR/agent of `fleet keys generate DIR` (default: "
    "plaintext)",
    "up": "CURVE on the agent link: DIR of `fleet keys generate DIR` (its coordinator/ and "
    "agent/ folders; default: plaintext, the link is on loopback)",
}


def add_parser(sub: Any) -> None:
    """Add ``fleet keys`` to the ``fleet`` command's sub-parsers."""
    keys = sub.add_parser("keys", help="CURVE keys for the agent link (docs/SECURITY.md)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    gen = keys_sub.add_parser(
        "generate",
        help="write a coordinator and an agent key pair into DIR/coordinator and DIR/agent",
    )
    gen.add_argument("dir", type=Path, metavar="DIR")
    gen.add_argument("--force", action="store_true", help="replace keys already in DIR")
    gen.set_defaults(func=_cmd_generate)


def add_curve_arg(p: argparse.ArgumentParser, role: str) -> None:
    """Add ``--curve-keys DIR`` to ``fleet ROLE`` (coordinator, agent or up)."""
    p.add_argument("--curve-keys", default=None, metavar="DIR", help=_HELP[role])


def _check_curve() -> None:
    if not curve_available():
        raise FleetError("this libzmq has no CURVE support (pyzmq's wheels have it; a libzmq "
                         "built without libsodium does not)")  # fmt: skip


def server_keys(args: argparse.Namespace) -> ServerKeys | None:
    """``fleet coordinator --curve-keys``'s keys, loaded; None without the option.

    Raises:
        ConfigError: a folder without the coordinator's keys, or a bad key file.
    """
    if args.curve_keys is None:
        return None
    _check_curve()
    return load_server_keys(args.curve_keys, "--curve-keys")


def client_keys(args: argparse.Namespace) -> ClientKeys | None:
    """``fleet agent --curve-keys``'s keys, loaded; None without the option.

    Raises:
        ConfigError: a folder without an agent's keys, or a bad key file.
    """
    if args.curve_keys is None:
        return None
    _check_curve()
    return load_client_keys(args.curve_keys, "--curve-keys")


def up_keys(args: argparse.Namespace) -> tuple[ServerKeys, ClientKeys] | None:
    """``fleet up --curve-keys DIR``: the coordinator's and the local agent's keys.

    Raises:
        ConfigError: DIR is not what ``fleet keys generate DIR`` wrote.
    """
    if args.curve_keys is None:
        return None
    _check_curve()
    root = Path(args.curve_keys)
    if not root.is_dir():
        raise ConfigError("--curve-keys", str(root), "is not a folder")
    return (
        load_server_keys(root / SERVER, "--curve-keys"),
        load_client_keys(root / CLIENT, "--curve-keys"),
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    _check_curve()
    out = generate_keys(args.dir, force=args.force)
    print(f"""wrote the agent link's CURVE keys (secret files mode 0600):
  {out.coordinator}/   the coordinator's key pair and the agent public key it lets in
  {out.agent}/         the agents' key pair and the coordinator's public key

on one machine:
  fleet coordinator --curve-keys {out.coordinator} ...
  fleet agent --curve-keys {out.agent} ...
  fleet up --curve-keys {args.dir} ...

on Kubernetes (daemonset/base mounts these Secrets; docs/SECURITY.md):
  kubectl -n fleet-system create secret generic fleet-coordinator-curve \
      --from-file={out.coordinator}
  kubectl -n fleet-system create secret generic fleet-agent-curve --from-file={out.agent}

Keep {out.coordinator}/{SERVER}.key_secret and {out.agent}/{CLIENT}.key_secret private.""")
    return 0


__all__ = ["add_curve_arg", "add_parser", "client_keys", "server_keys", "up_keys"]
