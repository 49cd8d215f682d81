"""Messages between agent and coordinator (msgpack over ZMQ).

Every message is a frozen dataclass with a ``TYPE`` tag. The codec (:mod:`fleet.protocol.codec`)
puts the protocol version in a header frame and the message, as a msgpack map with a ``type``
key, in the payload frame.

Direction::

    agent → coordinator   Register, Heartbeat, KVEventBatch, ErrorReport
    coordinator → agent   Welcome, AssignEngine, UnassignEngine, PrestageModel, ErrorReport
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from .kvevents import KVEvent

PROTOCOL_VERSION = 1

EngineState = Literal["starting", "ready", "unhealthy", "backoff", "stopping", "stopped", "failed"]
EngineRole = Literal["both", "prefill", "decode"]
EngineKind = Literal["vllm", "sim"]

ENGINE_STATES: tuple[str, ...] = (
    "starting",
    "ready",
    "unhealthy",
    "backoff",
    "stopping",
    "stopped",
    "failed",
)
ENGINE_ROLES: tuple[str, ...] = ("both", "prefill", "decode")
ENGINE_KINDS: tuple[str, ...] = ("vllm", "sim")


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as the agent last read it through NVML.

    ``fake`` marks a GPU the agent pretends to have (``--fake-gpus``): its engines run as
    simulators or CPU vLLM. Senders that predate the field send none, which decodes as False.
    """

    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    utilization_pct: float
    temperature_c: float
    power_w: float
    ecc_uncorrected: int
    healthy: bool
    xids: tuple[int, ...] = ()
    reason: str = ""
    fake: bool = False


@dataclass(frozen=True)
class EngineSpec:
    """What the coordinator asks an agent to run."""

    engine_id: str
    model: str  # the served model name clients use
    model_path: str
    kind: str = "vllm"
    role: str = "both"
    gpus: tuple[int, ...] = ()  # GPU indices on the node; empty = CPU engine
    block_size: int = 32
    max_model_len: int = 1024
    extra_args: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()  # more served model names
    # One rank of a tensor-parallel group spread over ``nnodes`` nodes (docs/DEPLOYMENTS.md,
    # "Tensor-parallel groups"). ``nnodes`` 1 is an ordinary engine (its GPUs, if any, are its
    # tensor-parallel size). ``group`` is the group's engine id (rank 0's, the routable one);
    # ``master_port`` 0 on rank 0 lets its agent pick one, reported in EngineStatus.
    tensor_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = ""
    master_port: int = 0
    group: str = ""

    @property
    def is_rank(self) -> bool:
        """True for a rank of a group spread over nodes."""
        return self.nnodes > 1


@dataclass(frozen=True)
class EngineStatus:
    """An engine as its agent sees it."""

    engine_id: str
    model: str
    url: str  # the engine's own HTTP base URL
    state: str
    role: str = "both"
    kind: str = "vllm"
    pid: int = 0
    restarts: int = 0
    gpus: tuple[int, ...] = ()
    block_size: int = 32
    kv_events: int = 0
    last_error: str = ""
    # A rank of a tensor-parallel group (see EngineSpec): its group, rank and rendezvous.
    group: str = ""
    node_rank: int = 0
    nnodes: int = 1
    master_addr: str = ""
    master_port: int = 0


@dataclass(frozen=True)
class CachedModelInfo:
    """A complete model in an agent's model store (docs/MODELSTORE.md).

    ``pinned``: an engine on the node uses it (it cannot be evicted). ``last_used``: epoch
    seconds of its last fetch or release (the LRU order).
    """

    uri: str
    size_bytes: int
    pinned: bool = False
    last_used: float = 0.0


@dataclass(frozen=True)
class FetchInfo:
    """A model download in flight on an agent, or the last failure of one not retried since.

    ``state`` is ``listing``, ``downloading`` or ``failed`` (then ``error`` says why);
    ``eta_s`` is None while the rate is unknown.
    """

    uri: str
    state: str
    bytes_done: int = 0
    bytes_total: int = 0
    rate_bps: float = 0.0
    eta_s: float | None = None
    error: str = ""


@dataclass(frozen=True)
class Register:
    """First message of an agent on a (new) link: who it is and what it runs."""

    TYPE: ClassVar[str] = "register"
    node_id: str
    agent_url: str
    agent_version: str
    gpus: tuple[GpuInfo, ...] = ()
    engines: tuple[EngineStatus, ...] = ()
    # The model store's state; senders without a store (or predating it) send none.
    models: tuple[CachedModelInfo, ...] = ()
    fetches: tuple[FetchInfo, ...] = ()


@dataclass(frozen=True)
class Welcome:
    """The coordinator's answer to Register."""

    TYPE: ClassVar[str] = "welcome"
    coordinator_id: str
    heartbeat_interval_s: float


@dataclass(frozen=True)
class Heartbeat:
    """Periodic node, GPU and engine state."""

    TYPE: ClassVar[str] = "heartbeat"
    node_id: str
    seq: int
    healthy: bool
    gpus: tuple[GpuInfo, ...] = ()
    engines: tuple[EngineStatus, ...] = ()
    models: tuple[CachedModelInfo, ...] = ()  # as in Register
    fetches: tuple[FetchInfo, ...] = ()


@dataclass(frozen=True)
class AssignEngine:
    """Coordinator → agent: run this engine (idempotent by engine_id)."""

    TYPE: ClassVar[str] = "assign"
    spec: EngineSpec


@dataclass(frozen=True)
class UnassignEngine:
    """Coordinator → agent: stop and forget this engine."""

    TYPE: ClassVar[str] = "unassign"
    engine_id: str


@dataclass(frozen=True)
class PrestageModel:
    """Coordinator → agent: fetch this model source into the node's store now, before any
    engine needs it (idempotent: a cached or downloading URI is left as it is). Progress and
    the result come back in heartbeats (``Heartbeat.fetches`` / ``Heartbeat.models``)."""

    TYPE: ClassVar[str] = "prestage"
    uri: str


@dataclass(frozen=True)
class KVEventBatch:
    """One of an engine's KV-event batches, relayed with the engine's own sequence number."""

    TYPE: ClassVar[str] = "kv"
    node_id: str
    engine_id: str
    seq: int
    ts: float
    events: tuple[KVEvent, ...] = ()
    dp_rank: int = 0
    model: str = ""  # the engine's served model, so the receiver can key blocks before it
    # has seen a heartbeat naming the engine
    # True when the sender lost events it could not recover (a gap older than the engine's
    # replay buffer): the receiver drops what it knows of the engine, then applies this batch.
    resync: bool = False


@dataclass(frozen=True)
class KVSnapshot:
    """One part of the blocks an engine holds, as of its batch ``seq`` (-1: before any), sent
    by the agent to a coordinator that (re)connected. Part 0 replaces what the receiver knows
    of the engine; the parts of one snapshot follow each other, before any newer batch."""

    TYPE: ClassVar[str] = "kv_snapshot"
    node_id: str
    engine_id: str
    model: str
    seq: int
    part: int
    parts: int
    events: tuple[KVEvent, ...] = ()


@dataclass(frozen=True)
class ErrorReport:
    """Either side tells the other that something it sent was rejected."""

    TYPE: ClassVar[str] = "error"
    code: str
    message: str
    node_id: str = ""


Message = (
    Register
    | Welcome
    | Heartbeat
    | AssignEngine
    | UnassignEngine
    | PrestageModel
    | KVEventBatch
    | KVSnapshot
    | ErrorReport
)

MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Register,
        Welcome,
        Heartbeat,
        AssignEngine,
        UnassignEngine,
        PrestageModel,
        KVEventBatch,
        KVSnapshot,
        ErrorReport,
    )
}

__all__ = [
    "ENGINE_KINDS",
    "ENGINE_ROLES",
    "ENGINE_STATES",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "AssignEngine",
    "CachedModelInfo",
    "EngineKind",
    "EngineRole",
    "EngineSpec",
    "EngineState",
    "EngineStatus",
    "ErrorReport",
    "FetchInfo",
    "GpuInfo",
    "Heartbeat",
    "KVEventBatch",
    "KVSnapshot",
    "Message",
    "PrestageModel",
    "Register",
    "UnassignEngine",
    "Welcome",
]
