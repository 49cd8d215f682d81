"""CURVE keys of the agent link: generated, loaded, and set on the link's sockets.

``fleet keys generate DIR`` writes one folder per side of the link, each what one Kubernetes
Secret holds (docs/SECURITY.md)::

    DIR/coordinator/coordinator.key_secret   the coordinator's key pair
    DIR/coordinator/agent.key                an agent public key it lets in (every *.key is one)
    DIR/agent/agent.key_secret               the agents' key pair
    DIR/agent/coordinator.key                the coordinator's public key

The files are ZMQ certificates (``zmq.auth``'s format, Z85 keys); secret files are mode 0600.
A coordinator given its folder is a CURVE server and lets in only the agents whose public key
is a ``*.key`` file there (the coordinator's own ``coordinator.key``, if present, excepted);
an agent given its folder is a CURVE client of the coordinator's key.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
import zmq.utils.z85
from zmq.utils.monitor import parse_monitor_message

from .errors import ConfigError

SERVER = "coordinator"
CLIENT = "agent"
#: The ZAP domain of the agent link: with ``ZAP_ENFORCE_DOMAIN`` set, a server whose ZAP handler
#: is missing refuses every client instead of letting every one in.
ZAP_DOMAIN = b"fleet-agent-link"


def curve_available() -> bool:
    """Whether this libzmq does CURVE (built with libsodium or tweetnacl)."""
    return bool(zmq.has("curve"))


@dataclass(frozen=True)
class ServerKeys:
    """The coordinator's side: its key pair and the folder of agent public keys it lets in.

    Attributes:
        folder: the folder the keys came from; :func:`authorized_keys` reads it again.
        public: the coordinator's public key (Z85).
        secret: its secret key (Z85).
    """

    folder: Path
    public: bytes
    secret: bytes = field(repr=False)


@dataclass(frozen=True)
class ClientKeys:
    """An agent's side: its key pair and the coordinator's public key (all Z85)."""

    public: bytes
    secret: bytes = field(repr=False)
    server: bytes


def _certificate(path: Path, key: str, *, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(key, str(path), f"not a readable ZMQ certificate: {exc}") from exc
    if secret and secret_key is None:
        raise ConfigError(key, str(path), "holds no secret key")
    for value in (public, secret_key):
        if value is not None and len(value) != 40:
            raise ConfigError(key, str(path), "a key is not 40 Z85 characters")
    return public, secret_key


def _folder(folder: str | os.PathLike[str], key: str) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(key, str(path), "is not a folder (`fleet keys generate DIR` makes one)")
    return path


def load_server_keys(folder: str | os.PathLike[str], key: str = "curve_keys") -> ServerKeys:
    """The coordinator's keys from ``folder`` (``DIR/coordinator`` of ``fleet keys generate``).

    Raises:
        ConfigError: ``key`` names no such folder, it lacks ``coordinator.key_secret``, or a
            key file there is not a certificate.
    """
    path = _folder(folder, key)
    secret_file = path / f"{SERVER}.key_secret"
    if not secret_file.exists():
        raise ConfigError(key, str(path), f"has no {secret_file.name} (give the coordinator "
                          "DIR/coordinator of `fleet keys generate DIR`)")  # fmt: skip
    public, secret = _certificate(secret_file, key, secret=True)
    assert secret is not None
    keys = ServerKeys(path, public, secret)
    authorized_keys(keys)  # every public key file must load now, not at the first handshake
    return keys


def authorized_keys(keys: ServerKeys) -> dict[bytes, str]:
    """The agent public keys the coordinator lets in now: raw 32-byte key → its file's name.

    Every ``*.key`` file in the folder but the coordinator's own public key.

    Raises:
        ConfigError: the folder is gone, or a ``*.key`` file is not a certificate.
    """
    try:
        files = sorted(keys.folder.glob("*.key"))
    except OSError as exc:
        raise ConfigError("curve_keys", str(keys.folder), f"cannot be read: {exc}") from exc
    out: dict[bytes, str] = {}
    for path in files:
        public, _ = _certificate(path, "curve_keys", secret=False)
        if public != keys.public:
            out[zmq.utils.z85.decode(public)] = path.name
    return out


def load_client_keys(folder: str | os.PathLike[str], key: str = "curve_keys") -> ClientKeys:
    """An agent's keys from ``folder`` (``DIR/agent`` of ``fleet keys generate``): its one
    ``*.key_secret`` file and ``coordinator.key``.

    Raises:
        ConfigError: ``key`` names no such folder, a file is missing or not a certificate, or
            the folder holds several secret files.
    """
    path = _folder(folder, key)
    server_file = path / f"{SERVER}.key"
    if not server_file.exists():
        raise ConfigError(key, str(path), f"has no {server_file.name} (give the agent "
                          "DIR/agent of `fleet keys generate DIR`)")  # fmt: skip
    secrets = sorted(path.glob("*.key_secret"))
    if len(secrets) != 1:
        names = [p.name for p in secrets]
        raise ConfigError(key, str(path), f"must hold one *.key_secret file, not {names}")
    server, _ = _certificate(server_file, key, secret=False)
    public, secret = _certificate(secrets[0], key, secret=True)
    assert secret is not None
    return ClientKeys(public, secret, server)


def serve_curve(sock: zmq.Socket[bytes], keys: ServerKeys) -> None:
    """Make ``sock`` (before it binds) a CURVE server that asks ZAP about every client."""
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)


def connect_curve(sock: zmq.Socket[bytes], keys: ClientKeys) -> None:
    """Make ``sock`` (before it connects) a CURVE client of the coordinator's key."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)


@dataclass(frozen=True)
class GeneratedKeys:
    """What :func:`generate_keys` wrote: each side's folder."""

    coordinator: Path
    agent: Path


def generate_keys(folder: str | os.PathLike[str], *, force: bool = False) -> GeneratedKeys:
    """Write a coordinator and an agent key pair into ``folder`` (see the module docstring).

    The keys are made in a private (0700) folder beside their final place and moved there, so a
    secret file is never readable by others, not even while it is written.

    Raises:
        ConfigError: a key file is there already and ``force`` is False.
    """
    root = Path(folder)
    out = GeneratedKeys(root / SERVER, root / CLIENT)
    placed = {
        out.coordinator / f"{SERVER}.key_secret": f"{SERVER}.key_secret",
        out.coordinator / f"{CLIENT}.key": f"{CLIENT}.key",
        out.agent / f"{CLIENT}.key_secret": f"{CLIENT}.key_secret",
        out.agent / f"{SERVER}.key": f"{SERVER}.key",
    }
    existing = [str(p) for p in placed if p.exists()]
    if existing and not force:
        raise ConfigError("folder", str(root), f"holds keys already ({', '.join(existing)}); "
                          "--force replaces them")  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".fleet-keys-", dir=root))  # mode 0700
    try:
        for name in (SERVER, CLIENT):
            zmq.auth.create_certificates(work, name)
        for path in work.iterdir():
            path.chmod(0o600 if path.name.endswith("_secret") else 0o644)
        for side in (out.coordinator, out.agent):
            side.mkdir(mode=0o755, exist_ok=True)
        for target, name in placed.items():
            os.replace(work / name, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


#: The monitor events of a failed handshake (a socket's ``get_monitor_socket(HANDSHAKE_FAILED)``).
HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_PROTOCOL_ERRORS: dict[int, str] = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "the peer does not speak CURVE (plaintext)",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "cryptographic failure (a key for another "
    "coordinator, or a forged box)",
    zmq.PROTOCOL_ERROR_ZMTP_KEY_EXCHANGE: "key exchange failed",
}


@dataclass(frozen=True)
class HandshakeFailure:
    """One failed handshake, from a monitor socket.

    Attributes:
        auth: ZAP refused the peer's key (else the handshake itself failed).
        why: what failed, for a log line.
    """

    auth: bool
    why: str


def handshake_failure(frames: list[bytes]) -> HandshakeFailure | None:
    """A monitor message as a :class:`HandshakeFailure`; None for other events."""
    event = parse_monitor_message(frames)
    kind, value = int(event["event"]), int(event["value"])
    if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return HandshakeFailure(True, f"the key was refused (ZAP status {value})")
    if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        why = _PROTOCOL_ERRORS.get(value, f"protocol error 0x{value:x}")
        return HandshakeFailure(False, why)
    if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        return HandshakeFailure(False, "failed without detail (errno "
                                f"{value}: {os.strerror(value)})")  # fmt: skip
    return None


__all__ = [
    "CLIENT",
    "HANDSHAKE_FAILED",
    "SERVER",
    "ZAP_DOMAIN",
    "ClientKeys",
    "GeneratedKeys",
    "HandshakeFailure",
    "ServerKeys",
    "authorized_keys",
    "connect_curve",
    "curve_available",
    "generate_keys",
    "handshake_failure",
    "load_client_keys",
    "load_server_keys",
    "serve_curve",
]
