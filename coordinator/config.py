"""The coordinator's settings: one frozen, validated dataclass."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

from hypercorn.config import Config as HypercornConfig

from fleet.protocol.curve import ServerKeys
from fleet.protocol.errors import ConfigError

from .apikeys import ApiKeys
from .autoscale import AutoscaleConfig
from .deploybook import EngineDefaults
from .deployment import Deployment
from .frontpolicy import FrontLimits
from .kvindex import DEFAULT_MAX_ENTRIES
from .nodescale import NodeScaleConfig
from .resilience import ResilienceConfig
from .respcachestore import ResponseCacheConfig
from .router.scheduler import SchedulingConfig

KEEP_ALIVE_S = 75.0  # an idle client connection is closed after this


@dataclass(frozen=True)
class CoordinatorConfig:
    """Everything the coordinator needs, validated once.

    Raises:
        ConfigError: a key with a bad value.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    agent_endpoint: str = "tcp://127.0.0.1:5555"
    # CURVE on the agent link (``--curve-keys``: its keys and the authorized agents' public
    # keys, read again every curve_reload_s); None: plaintext, for loopback and trusted networks.
    curve_keys: ServerKeys | None = None
    curve_reload_s: float = 5.0
    deployments: tuple[Deployment, ...] = ()
    heartbeat_interval_s: float = 1.0
    lost_after_missed: int = 3
    assign_timeout_s: float = 30.0
    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout_s: float = 60.0
    upstream_connect_timeout_s: float = 5.0
    upstream_read_timeout_s: float = 600.0
    grace_s: float = 5.0
    drain_s: float = 30.0  # drain(): how long requests in flight get to finish
    http_fd: int | None = None  # serve on this listening socket (a hot restart's) over host:port
    link_bind_wait_s: float = 10.0  # the agent endpoint in use (a draining predecessor): retry
    kv_index_max_entries: int = DEFAULT_MAX_ENTRIES
    # A folder of FleetModel YAML files, re-read on change (docs/DEPLOYMENTS.md); None: none.
    deployments_dir: str | None = None
    deployments_poll_s: float = 1.0
    # What a declared deployment does not say (engine kind, settings); the --model shorthand
    # is ``deployments``.
    engine_defaults: EngineDefaults = field(default_factory=EngineDefaults)
    # Bearer key the admin API (/admin/v1/...) requires; "" leaves it open.
    admin_key: str = ""
    # Admission: requests in flight per routable engine before requests queue, and waiters per
    # model before new ones are shed (503).
    slots_per_engine: int = 64
    max_queue: int = 500
    max_queue_wait_s: float = 30.0  # the longest wait in the queue of a request with no deadline
    # HTTPS: a PEM certificate (chain) and its key; None: plain HTTP.
    tls_cert: str | None = None
    tls_key: str | None = None
    # Fleet-wide rate limits and max_queue (sharedlimits.py): shared in this Redis, else (and
    # while it is down) each of coordinators_expected coordinators enforces its share.
    redis_url: str | None = None
    coordinators_expected: int = 1
    # The response cache (respcacheflow.py, docs/CACHE.md); None: off.
    response_cache: ResponseCacheConfig | None = None
    # No engine is placed this long after start, so every live node can report what it runs
    # first (None: until a silent node would count as lost, heartbeat × lost_after_missed).
    placement_settle_s: float | None = None
    # The scheduling profiles (an EndpointPickerConfig, loaded); None: Fleet's default config.
    scheduling: SchedulingConfig | None = None
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)
    api_keys: ApiKeys = field(default_factory=ApiKeys)  # none: the API is open
    autoscale: AutoscaleConfig = field(default_factory=AutoscaleConfig)
    gpu_prices: dict[str, float] = field(default_factory=dict)  # dollars per GPU-hour by tier
    tier_speeds: dict[str, float] = field(default_factory=dict)  # autoscaler units per engine
    # An engine no deployment wants (scaled down, deleted) is stopped once idle, or after this.
    engine_drain_s: float = 30.0
    coordinator_id: str = field(default_factory=lambda: f"coord-{uuid.uuid4().hex[:8]}")
    # Several coordinators: the one holding this lock file leads (places engines); None: this
    # is the only coordinator, and leads. A new leader places after leader_settle_s (None:
    # two heartbeat intervals, so that the old leader's last assignments are reported).
    leader_lock: str | None = None
    # Several coordinators in a cluster: the holder of this coordination.k8s.io Lease
    # ("NAMESPACE/NAME") leads; kube_api: the API server's URL (None: in-cluster, else the
    # kubeconfig). Exclusive with leader_lock.
    leader_lease: str | None = None
    kube_api: str | None = None
    lease_duration_s: int = 15
    # Serve the FleetModel custom resources of this namespace (through kube_api); None: none.
    fleetmodels_namespace: str | None = None
    fleetmodels_watch_s: int = 60  # each watch request's timeoutSeconds
    lease_renew_deadline_s: float = 10.0
    leader_retry_s: float = 0.5
    leader_settle_s: float | None = None
    # Ask for GPU nodes through a scale target's /scale when placement lacks GPUs (leader
    # only; the API at kube_api); None: never (nodescale.py, kubescale.py).
    node_scale: NodeScaleConfig | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError("port", self.port, "must be 0..65535")
        for key in (
            "heartbeat_interval_s",
            "assign_timeout_s",
            "body_timeout_s",
            "upstream_connect_timeout_s",
            "upstream_read_timeout_s",
        ):
            if not getattr(self, key) > 0:
                raise ConfigError(key, getattr(self, key), "must be > 0")
        if self.leader_lock is not None and self.leader_lease is not None:
            raise ConfigError("leader_lease", self.leader_lease, "cannot go with leader_lock")
        if self.leader_lease is not None and len(self.lease_ref) != 2:
            raise ConfigError("leader_lease", self.leader_lease, "must be NAMESPACE/NAME")
        if not 0 < self.lease_renew_deadline_s < self.lease_duration_s:
            raise ConfigError(
                "lease_renew_deadline_s",
                self.lease_renew_deadline_s,
                f"must be > 0 and < lease_duration_s ({self.lease_duration_s})",
            )
        if not self.leader_retry_s > 0:
            raise ConfigError("leader_retry_s", self.leader_retry_s, "must be > 0")
        if self.leader_settle_s is not None and self.leader_settle_s < 0:
            raise ConfigError("leader_settle_s", self.leader_settle_s, "must be >= 0")
        if not self.curve_reload_s > 0:
            raise ConfigError("curve_reload_s", self.curve_reload_s, "must be > 0")
        for key in ("grace_s", "drain_s", "link_bind_wait_s", "engine_drain_s"):
            if not getattr(self, key) >= 0:
                raise ConfigError(key, getattr(self, key), "must be >= 0")
        if self.placement_settle_s is not None and self.placement_settle_s < 0:
            raise ConfigError("placement_settle_s", self.placement_settle_s, "must be >= 0")
        if self.lost_after_missed < 1:
            raise ConfigError("lost_after_missed", self.lost_after_missed, "must be >= 1")
        if not self.deployments_poll_s > 0:
            raise ConfigError("deployments_poll_s", self.deployments_poll_s, "must be > 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_key", self.tls_key, "tls_cert and tls_key go together")
        if not self.max_queue_wait_s > 0:
            raise ConfigError("max_queue_wait_s", self.max_queue_wait_s, "must be > 0")
        for key in ("slots_per_engine", "max_queue", "coordinators_expected"):
            if getattr(self, key) < 1:
                raise ConfigError(key, getattr(self, key), "must be >= 1")
        if self.kv_index_max_entries < 1:
            raise ConfigError("kv_index_max_entries", self.kv_index_max_entries, "must be >= 1")
        if self.max_body_bytes < 1024:
            raise ConfigError("max_body_bytes", self.max_body_bytes, "must be >= 1024")
        if not self.agent_endpoint.startswith(("tcp://", "ipc://", "inproc://")):
            raise ConfigError("agent_endpoint", self.agent_endpoint, "must be a ZMQ endpoint")

    @property
    def lease_ref(self) -> tuple[str, ...]:
        """``leader_lease`` as (namespace, name); () when unset."""
        if not self.leader_lease:
            return ()
        return tuple(p for p in self.leader_lease.split("/") if p)

    def front_limits(self) -> FrontLimits:
        """The front HTTP server's limits (:mod:`.fastserve`), as hypercorn's and quart's."""
        return FrontLimits(
            max_body_bytes=self.max_body_bytes,
            body_timeout_s=self.body_timeout_s,
            keep_alive_s=KEEP_ALIVE_S,
        )

    def hypercorn(self) -> HypercornConfig:
        """The HTTP server's settings."""
        config = HypercornConfig()
        host = f"[{self.host}]" if ":" in self.host else self.host
        config.bind = [f"{host}:{self.port}"]
        if self.http_fd is not None:
            config.bind = [f"fd://{self.http_fd}"]
        config.graceful_timeout = self.drain_s
        config.accesslog = None
        config.errorlog = logging.getLogger("fleet.coordinator.http")
        config.keep_alive_timeout = KEEP_ALIVE_S
        # A burst of new connections must reach admission control (which sheds with 503 +
        # Retry-After), not overflow the kernel's accept queue (hypercorn's default is 100);
        # the kernel caps it at net.core.somaxconn.
        config.backlog = 4096
        if self.tls_cert:  # HTTPS on the one port (front server and hypercorn alike)
            config.certfile, config.keyfile = self.tls_cert, self.tls_key
            config.alpn_protocols = ["http/1.1"]  # HTTP/1.1 only, as on plain connections
        return config


__all__ = ["CoordinatorConfig"]
