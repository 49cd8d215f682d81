"""A deployment as placement sees it: a model to serve, by how many engines of which kind."""

from __future__ import annotations

from dataclasses import dataclass

from fleet.protocol.errors import ConfigError
from fleet.protocol.messages import ENGINE_KINDS, ENGINE_ROLES, EngineSpec

from .deployspec import TP_LAYOUTS
from .engineargs import with_kv_role
from .gpumemory import EngineMemory


@dataclass(frozen=True)
class Deployment:
    """A model the fleet should serve: how many engines of which kind.

    ``name`` (default: ``model``) names the deployment and its engines (``NAME-0``, ...; with
    ``roles`` = (P, D): ``NAME-prefill-0`` .. ``NAME-prefill-{P-1}``, then ``NAME-decode-0`` ..,
    each engine launched with its role);
    ``model`` is the served name clients ask for, ``aliases`` more served names. Deployments
    serving one name split its new sessions by ``traffic_weight`` (versions, canaries).

    Raises:
        ConfigError: on a bad value (names the key).
    """

    model: str
    model_path: str
    replicas: int = 1
    kind: str = "vllm"
    role: str = "both"
    gpus_per_engine: int = 0
    block_size: int = 32
    max_model_len: int = 1024
    extra_args: tuple[str, ...] = ()
    name: str = ""
    aliases: tuple[str, ...] = ()
    traffic_weight: int = 100
    # Above 1: each engine is a tensor-parallel group, placed by .tpgroups (not here);
    # gpus_per_engine is then the whole group's. tp_layout: "auto", "spread" or "pack".
    tensor_parallel_size: int = 1
    tp_layout: str = "auto"
    # Memory one engine needs on each of its GPUs (GPU engines of a local model folder; None:
    # unknown, any free GPU will do).
    memory: EngineMemory | None = None
    # Preferred GPU tiers, best first (``spec.gpuTier``; soft: other tiers when these are full).
    tiers: tuple[str, ...] = ()
    # The tier each engine slot should run on (NAME-i: slot_tiers[i]), from the autoscaler's
    # cheapest mix (.costmix); soft, like ``tiers``, and only for engines being placed.
    slot_tiers: tuple[str, ...] = ()
    # Disaggregated serving: (prefill engines, decode engines); None: every engine is ``role``.
    roles: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model", self.model, "must be a non-empty name")
        if not self.name:
            object.__setattr__(self, "name", self.model)
        if self.traffic_weight < 0:
            raise ConfigError("traffic_weight", self.traffic_weight, "must be >= 0")
        if self.replicas < 0:
            raise ConfigError("replicas", self.replicas, "must be >= 0")
        if self.kind not in ENGINE_KINDS:
            raise ConfigError("engine", self.kind, f"must be one of {ENGINE_KINDS}")
        if self.role not in ENGINE_ROLES:
            raise ConfigError("role", self.role, f"must be one of {ENGINE_ROLES}")
        if self.roles is not None:
            if min(self.roles) < 1 or sum(self.roles) != self.replicas:
                why = f"must be (prefill >= 1, decode >= 1) adding up to replicas {self.replicas}"
                raise ConfigError("roles", self.roles, why)
        if self.gpus_per_engine < 0:
            raise ConfigError("gpus_per_engine", self.gpus_per_engine, "must be >= 0")
        if self.block_size <= 0:
            raise ConfigError("block_size", self.block_size, "must be > 0")
        if self.max_model_len <= 0:
            raise ConfigError("max_model_len", self.max_model_len, "must be > 0")
        _check_tp(self)

    @property
    def served_names(self) -> tuple[str, ...]:
        return (self.model, *self.aliases)

    def engine_ids(self) -> list[str]:
        if self.roles is not None:
            prefill, decode = self.roles
            return [f"{self.name}-prefill-{i}" for i in range(prefill)] + [
                f"{self.name}-decode-{i}" for i in range(decode)
            ]
        return [f"{self.name}-{i}" for i in range(self.replicas)]

    def role_of(self, engine_id: str) -> str:
        """The role an engine of this deployment runs with (``prefill``, ``decode`` or
        ``role``), from its id (a tensor-parallel rank's: its group's)."""
        if self.roles is not None:
            for role in ("prefill", "decode"):
                if engine_id.startswith(f"{self.name}-{role}-"):
                    return role
        return self.role

    def tiers_for(self, engine_id: str) -> tuple[str, ...]:
        """The tiers an engine of this deployment prefers: its slot's, else ``tiers``."""
        index = engine_id.removeprefix(f"{self.name}-")
        if index.isdigit() and int(index) < len(self.slot_tiers):
            return (self.slot_tiers[int(index)],)
        return self.tiers

    def owned_ids(self) -> list[str]:
        """Every engine id this deployment owns: its engines and their groups' other ranks."""
        ranks = range(1, self.tensor_parallel_size)
        return [x for e in self.engine_ids() for x in (e, *(rank_engine_id(e, r) for r in ranks))]

    def spec(self, engine_id: str, gpus: tuple[int, ...]) -> EngineSpec:
        """What an engine of this deployment is launched with; a ``--kv-transfer-config``
        without ``kv_role`` gets its role's (:func:`~.engineargs.with_kv_role`)."""
        role = self.role_of(engine_id)
        return EngineSpec(
            engine_id=engine_id,
            model=self.model,
            model_path=self.model_path,
            kind=self.kind,
            role=role,
            gpus=gpus,
            block_size=self.block_size,
            max_model_len=self.max_model_len,
            extra_args=with_kv_role(self.extra_args, role),
            aliases=self.aliases,
        )


def rank_engine_id(group: str, rank: int) -> str:
    """The engine id of rank ``rank`` of tensor-parallel group ``group`` (rank 0: the group's)."""
    return group if rank == 0 else f"{group}.rank{rank}"


def _check_tp(d: Deployment) -> None:
    tp = d.tensor_parallel_size
    if tp < 1:
        raise ConfigError("tensor_parallel_size", tp, "must be >= 1")
    if d.tp_layout not in TP_LAYOUTS:
        raise ConfigError("tp_layout", d.tp_layout, f"must be one of {TP_LAYOUTS}")
    if tp > 1 and d.gpus_per_engine % tp:
        raise ConfigError("gpus_per_engine", d.gpus_per_engine, f"must be a multiple of {tp}")


__all__ = ["Deployment", "rank_engine_id"]
