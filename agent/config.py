"""The agent's settings: one frozen, validated dataclass."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from fleet.protocol.curve import ClientKeys
from fleet.protocol.errors import ConfigError

from .discovery import DiscoveryConfig
from .fakenvml import FakeGpuSpec
from .gpus import GpuConfig
from .launcher import LaunchConfig
from .store import StoreConfig
from .supervisor import SupervisorConfig


@dataclass(frozen=True)
class AgentConfig:
    """Everything an agent needs, validated once.

    Raises:
        ConfigError: a key with a bad value.
    """

    node_id: str = field(default_factory=socket.gethostname)
    # ZMQ endpoint of the coordinator; several coordinators: comma-separated, each told
    # everything (heartbeats, KV events), and whichever leads sends placement. Empty when
    # ``discovery`` finds them instead (one or the other).
    coordinator_endpoint: str = "tcp://127.0.0.1:5555"
    # Every coordinator behind a DNS name (a headless Service), followed as it changes.
    discovery: DiscoveryConfig | None = None
    http_host: str = "127.0.0.1"
    http_port: int = 8081
    heartbeat_interval_s: float = 1.0
    log_dir: Path | None = None
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    fake_gpus: tuple[FakeGpuSpec, ...] = ()  # ``--fake-gpus``: no NVML, these GPUs instead
    # Fetches engines' model_path URIs (hf://, s3://, http(s)://, file://); None = no store,
    # and an engine whose model_path is a URI fails with that reason.
    store: StoreConfig | None = None
    # CURVE on the links to the coordinators (``--curve-keys``); None: plaintext.
    curve_keys: ClientKeys | None = None

    def __post_init__(self) -> None:
        if not self.node_id or len(self.node_id) > 253:
            raise ConfigError("node_id", self.node_id, "must be 1..253 characters")
        endpoints = self.coordinator_endpoints
        if self.discovery is not None:
            if endpoints:
                raise ConfigError(
                    "coordinator_endpoint",
                    self.coordinator_endpoint,
                    "must be empty when discovery finds the coordinators",
                )
        elif not endpoints or not all(
            e.startswith(("tcp://", "ipc://", "inproc://")) for e in endpoints
        ):
            raise ConfigError(
                "coordinator_endpoint",
                self.coordinator_endpoint,
                "must be ZMQ endpoints, comma-separated",
            )
        if len(set(endpoints)) != len(endpoints):
            raise ConfigError("coordinator_endpoint", self.coordinator_endpoint, "has repeats")
        if not 0 <= self.http_port <= 65535:
            raise ConfigError("http_port", self.http_port, "must be 0..65535")
        if not self.heartbeat_interval_s > 0:
            raise ConfigError("heartbeat_interval_s", self.heartbeat_interval_s, "must be > 0")

    @property
    def coordinator_endpoints(self) -> tuple[str, ...]:
        """Every coordinator's endpoint."""
        return tuple(e.strip() for e in self.coordinator_endpoint.split(",") if e.strip())


__all__ = ["AgentConfig"]
