"""The declared deployments of a fleet and what placement makes of them: sans-I/O.

Deployments come from four places, kept apart so that each can change without the others:
the ``--model`` shorthand of ``fleet up``/``fleet coordinator`` (fixed), a ``--deployments``
folder of FleetModel YAML files (replaced whole on every change), FleetModel custom resources
(``--fleetmodels NAMESPACE``; replaced whole on every change), and the admin API (one
deployment at a time; kept in memory when there is no folder). :class:`DeploymentBook` holds
them, refuses a name two places claim, and turns each FleetModel into the
:class:`~.deployment.Deployment` placement works with (:func:`to_deployment`), higher priority
first. :func:`status` says, per deployment, how many engines are wanted, placed and ready, and
why each engine that is not ready is not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.protocol.errors import ConfigError

from .costs import engine_costs
from .deployment import Deployment
from .deployspec import FleetModel
from .placement import Placer
from .registry import FleetRegistry
from .tpgroups import TPGroups

API = "api"  # the origin of deployments made through the admin API
CLUSTER = "FleetModel"  # ... of FleetModel custom resources (a cluster's API server)
SHORTHAND = "--model"  # ... and of the command line's one-model shorthand
# Flags the Deployment carries as fields; taken out of the engine arguments so the engine
# gets them once.
_FIELD_FLAGS = ("--max-model-len", "--block-size")


@dataclass(frozen=True)
class EngineDefaults:
    """What a deployment does not say: the fleet's engine kind and settings."""

    kind: str = "vllm"
    gpus_per_engine: int = 0
    block_size: int = 32
    max_model_len: int = 1024
    extra_args: tuple[str, ...] = ()


def to_deployment(
    model: FleetModel,
    defaults: EngineDefaults,
    count: int | None = None,
    slot_tiers: tuple[str, ...] = (),
) -> tuple[Deployment, list[str]]:
    """The placement view of a FleetModel, and why it places fewer engines than declared.

    A local path (relative: to where Fleet started) or ``file://`` source is the engines' model
    folder; any other source (``hf://``, ``s3://``, ``http(s)://``) is passed on as it is, and
    each agent fetches it into its model store before launching. A tensor-parallel size above 1
    makes each engine a group (:mod:`.tpgroups`); replicas given as ``minReplicas``/
    ``maxReplicas`` run ``count`` (the autoscaler's, :mod:`.autoscale`; default
    ``minReplicas``), on the tiers ``slot_tiers`` prefers per engine (:mod:`.costmix`).
    """
    notes: list[str] = []
    args = model.engine
    replicas = len(model.engine_slots(count))
    roles = None
    if model.roles is not None:
        roles = (model.roles.prefill, model.roles.decode)
        if not any(a.startswith("--kv-transfer-config") for a in model.engine_args):
            notes.append(
                "spec.roles without --kv-transfer-config in spec.engineArgs: split requests "
                "work, but decode engines recompute the prompt (no KV connector moves it)"
            )
    path = model.source.location
    if model.source.scheme == "path":
        path = str(Path(path).resolve())  # relative to where Fleet was started
    if model.source.scheme not in ("path", "file"):
        path = model.source.uri  # each agent fetches it into its model store before launching
    deployment = Deployment(
        model=model.served_model_names[0],
        aliases=model.served_model_names[1:],
        name=model.name,
        model_path=path,
        replicas=replicas,
        kind=defaults.kind,
        gpus_per_engine=defaults.gpus_per_engine * model.tensor_parallel_size,
        block_size=args.block_size or defaults.block_size,
        max_model_len=args.max_model_len
        if args.max_model_len is not None and args.max_model_len > 0
        else defaults.max_model_len,
        extra_args=(*defaults.extra_args, *_without(model.engine_args, _FIELD_FLAGS)),
        traffic_weight=model.traffic_weight,
        tensor_parallel_size=model.tensor_parallel_size,
        tp_layout=model.tensor_parallel_layout,
        tiers=model.gpu_tiers,
        slot_tiers=slot_tiers,
        roles=roles,
    )
    return deployment, notes


def _without(args: tuple[str, ...], flags: tuple[str, ...]) -> tuple[str, ...]:
    """``args`` less ``flags`` (``--flag=value`` or ``--flag value``, dashes or underscores)."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0].replace("_", "-")
        if name in flags:
            skip = "=" not in arg
            continue
        out.append(arg)
    return tuple(out)


@dataclass
class DeploymentBook:
    """Every declared deployment, by origin (see the module docstring)."""

    defaults: EngineDefaults = field(default_factory=EngineDefaults)
    shorthand: tuple[Deployment, ...] = ()
    folder: Path | None = None
    _models: dict[str, tuple[str, FleetModel]] = field(default_factory=dict)  # name -> origin
    folder_error: str = ""  # the folder's last load problem ("" when it loaded)

    def models(self) -> list[tuple[str, FleetModel]]:
        """(origin, model) of every declared FleetModel, by name."""
        return [self._models[name] for name in sorted(self._models)]

    def get(self, name: str) -> tuple[str, FleetModel] | None:
        return self._models.get(name)

    def set_folder(self, models: tuple[FleetModel, ...], files: dict[str, str]) -> None:
        """Replace every folder deployment with ``models`` (``files``: name -> file).

        Raises:
            ConfigError: a name the shorthand or the admin API holds already (nothing changes).
        """
        self._check_free([m.name for m in models])
        kept = {n: v for n, v in self._models.items() if v[0] in (API, CLUSTER)}
        for m in models:
            if m.name in kept:
                by = "the admin API" if kept[m.name][0] == API else "a FleetModel resource"
                raise ConfigError("metadata.name", m.name, f"is declared through {by}")
        kept.update({m.name: (files.get(m.name, str(self.folder)), m) for m in models})
        self._models = kept
        self.folder_error = ""

    def set_cluster(self, models: list[FleetModel]) -> dict[str, str]:
        """Replace every deployment of FleetModel resources with ``models``; the problem of
        each one not taken (its name declared elsewhere), by name."""
        kept = {n: v for n, v in self._models.items() if v[0] != CLUSTER}
        taken = {d.name for d in self.shorthand}
        problems: dict[str, str] = {}
        for m in models:
            if m.name in taken or m.name in kept:
                where = SHORTHAND if m.name in taken else kept[m.name][0]
                problems[m.name] = f"metadata.name: {m.name!r} is declared by {where}"
                continue
            kept[m.name] = (CLUSTER, m)
        self._models = kept
        return problems

    def put(self, model: FleetModel, origin: str = API) -> bool:
        """Add or replace one deployment; True if it is new.

        Raises:
            ConfigError: the name belongs to the shorthand, or to a file when ``origin`` is the
                admin API without a folder.
        """
        held = self._models.get(model.name)
        if held is not None and held[0] != origin:
            raise ConfigError("metadata.name", model.name, f"is declared by {held[0]}")
        self._check_free([model.name])
        self._models[model.name] = (origin, model)
        return held is None

    def delete(self, name: str, origin: str = API) -> bool:
        """Remove one deployment of ``origin``; False if there is none by that name.

        Raises:
            ConfigError: it is declared elsewhere (a file, the shorthand).
        """
        held = self._models.get(name)
        if held is None:
            if any(d.name == name for d in self.shorthand):
                raise ConfigError("name", name, f"is declared by {SHORTHAND}")
            return False
        if held[0] != origin:
            raise ConfigError("name", name, f"is declared by {held[0]}")
        del self._models[name]
        return True

    def deployments(
        self,
        counts: Mapping[str, int] | None = None,
        slots: Mapping[str, tuple[str, ...]] | None = None,
    ) -> tuple[tuple[Deployment, ...], dict[str, list[str]]]:
        """What placement should run, higher priority first, and each deployment's notes;
        ``counts``: the autoscaler's replica counts by deployment name, ``slots`` the tier of
        each engine slot it chose."""
        notes: dict[str, list[str]] = {}
        ranked: list[tuple[int, str, Deployment]] = []
        for d in self.shorthand:
            ranked.append((0, d.name, d))
        for _, model in self._models.values():
            count = (counts or {}).get(model.name)
            tiers = (slots or {}).get(model.name, ())
            deployment, why = to_deployment(model, self.defaults, count, tiers)
            notes[model.name] = why
            ranked.append((-model.effective_priority, model.name, deployment))
        ranked.sort(key=lambda r: (r[0], r[1]))
        return tuple(d for _, _, d in ranked), notes

    def _check_free(self, names: list[str]) -> None:
        taken = {d.name for d in self.shorthand}
        for name in names:
            if name in taken:
                raise ConfigError("metadata.name", name, f"is declared by {SHORTHAND}")


def status(
    placer: Placer,
    registry: FleetRegistry,
    book: DeploymentBook,
    notes: dict[str, list[str]],
    now: float,
    groups: TPGroups | None = None,
) -> list[dict[str, Any]]:
    """Each deployment's state, as ``GET /admin/v1/deployments`` shows it.

    Per deployment: ``name``, ``servedModelNames``, ``version``, ``trafficWeight``, ``origin``,
    ``desired`` (engines wanted), ``placed`` (engines a live node runs or was asked to run),
    ``ready`` (routable), ``costPerHour`` (dollars, from the placer's prices), ``engines``
    (id, node, state) and ``reasons``: engine id -> why it is
    not ready, plus ``"deployment"`` -> why fewer engines are wanted than declared.
    """
    running: dict[str, tuple[str, str, str]] = {}  # engine id -> (node, state, last error)
    for node in registry.live_nodes():
        for engine_id, engine in node.engines.items():
            running[engine_id] = (node.node_id, engine.state, engine.last_error)
    routable = {e.id for e in registry.routable()}
    costs = engine_costs(registry, placer.prices)
    pending = placer.pending()
    declared = {name: (origin, model) for origin, model in book.models() for name in [model.name]}
    out: list[dict[str, Any]] = []
    for d in placer.deployments:
        origin, model = declared.get(d.name, (SHORTHAND, None))
        reasons: dict[str, str] = {}
        if notes.get(d.name):
            reasons["deployment"] = "; ".join(notes[d.name])
        engines: list[dict[str, str]] = []
        placed = ready = 0
        for engine_id in d.engine_ids():
            where = running.get(engine_id)
            if where is not None:
                node_id, state, error = where
                placed += 1
                engines.append({"id": engine_id, "node": node_id, "state": state})
                if engine_id in routable:
                    ready += 1
                elif state == "ready" and d.tensor_parallel_size > 1:
                    reasons[engine_id] = (
                        f"rank 0 ready on node {node_id}; waiting for every other rank"
                    )
                else:
                    reasons[engine_id] = f"{state} on node {node_id}" + (
                        f": {error}" if error else ""
                    )
            elif engine_id in pending:
                node_id, sent = pending[engine_id]
                placed += 1
                engines.append({"id": engine_id, "node": node_id, "state": "assigned"})
                reasons[engine_id] = (
                    f"assigned to node {node_id} {now - sent:.0f} s ago, not reported yet"
                )
            else:
                engines.append({"id": engine_id, "node": "", "state": "unplaced"})
                reasons[engine_id] = (
                    groups.why_unplaced(d, registry)
                    if groups is not None and d.tensor_parallel_size > 1
                    else placer.why_unplaced(d, registry, now)
                )
        out.append(
            {
                "name": d.name,
                "servedModelNames": list(d.served_names),
                "version": model.version if model is not None else "",
                "trafficWeight": d.traffic_weight,
                "origin": origin,
                "source": model.source.uri if model is not None else d.model_path,
                "desired": d.replicas,
                "placed": placed,
                "ready": ready,
                "costPerHour": round(sum(costs.get(e, 0.0) for e in d.engine_ids()), 4),
                "engines": engines,
                "reasons": reasons,
            }
        )
    return out


__all__ = [
    "API",
    "CLUSTER",
    "SHORTHAND",
    "DeploymentBook",
    "EngineDefaults",
    "status",
    "to_deployment",
]
