"""The FleetModel deployment schema: what to serve, parsed and checked at the edge.

A deployment is a document shaped as the Kubernetes custom resource Fleet will serve (camelCase,
``apiVersion: fleet.dev/v1alpha1``, ``kind: FleetModel``), so a file written for ``fleet up
--deployments DIR`` applies unchanged to a cluster. docs/DEPLOYMENTS.md describes every field.

:func:`parse_model` turns one document (a dict from YAML or JSON) into a frozen
:class:`FleetModel`, collecting every problem of the document into one :class:`DeploymentError`
whose lines each name the deployment and the field path
(``deployment 'chat-v2': spec.tensorParallelSize: must be an integer >= 1, got 0``). Unknown
fields are rejected by name. :meth:`FleetModel.to_dict` gives the document back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .deployfields import Fields, is_int
from .engineargs import EngineArgs, check_engine_args
from .errors import DeploymentError
from .modelsource import ModelSource

API_VERSION = "fleet.dev/v1alpha1"
KIND = "FleetModel"
#: Built-in priority classes (``spec.priorityClassName``) -> priority; higher places first.
PRIORITY_CLASSES: dict[str, int] = {"critical": 1000, "high": 100, "normal": 0, "low": -100}
PRIORITY_RANGE = (-1_000_000, 1_000_000)
DEFAULT_TRAFFIC_WEIGHT = 100
MAX_TRAFFIC_WEIGHT = 1_000_000

_TOP = ("apiVersion", "kind", "metadata", "spec")
_METADATA = ("name", "namespace", "labels", "annotations")
SPEC_FIELDS = (  # every spec field, as daemonset/crds/fleetmodel.yaml declares them
    "servedModelNames",
    "source",
    "version",
    "trafficWeight",
    "replicas",
    "minReplicas",
    "maxReplicas",
    "tensorParallelSize",
    "tensorParallelLayout",
    "engineArgs",
    "roles",
    "priorityClassName",
    "priority",
    "gpuTier",
)
_MOVED = {
    "labels": "metadata.labels",
    "annotations": "metadata.annotations",
    "name": "metadata.name",
    "namespace": "metadata.namespace",
}
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_TIER = re.compile(r"[a-z0-9][a-z0-9_.-]*")
TP_LAYOUTS = ("auto", "spread", "pack")  # docs/DEPLOYMENTS.md, "Tensor-parallel groups"


@dataclass(frozen=True)
class Roles:
    """Disaggregated serving: how many prefill and decode engines (each at least 1)."""

    prefill: int
    decode: int


@dataclass(frozen=True)
class FleetModel:
    """One deployment, as declared. Build it with :func:`parse_model`, which checks every field.

    Attributes:
        name: ``metadata.name``, a DNS label; engine ids start with it.
        served_model_names: names clients ask for (``model`` in the OpenAI API).
        source: where the weights come from.
        version: free text shown in status (``""`` when not given).
        traffic_weight: this deployment's share of new sessions among those serving one name.
        replicas: a fixed engine count, or None with ``min_replicas``/``max_replicas`` or
            ``roles``.
        min_replicas: the autoscaler's lower bound (None unless set).
        max_replicas: the autoscaler's upper bound (None unless set).
        tensor_parallel_size: ranks per engine (a tensor-parallel group above 1).
        tensor_parallel_layout: how a group's ranks sit on nodes: ``pack`` (one node),
            ``spread`` (one rank per node) or ``auto`` (GPU groups pack when a node has the
            GPUs, else spread; CPU groups spread).
        engine_args: extra ``vllm serve`` arguments.
        roles: prefill/decode engine counts; None = every engine does both.
        priority_class_name: a key of :data:`PRIORITY_CLASSES`, or None.
        priority: an explicit priority, or None.
        gpu_tiers: preferred GPU tiers, best first (soft: other tiers are used when these are
            full).
        labels: ``metadata.labels`` as sorted pairs.
        annotations: ``metadata.annotations`` as sorted pairs.
        namespace: ``metadata.namespace`` (``""`` when not given).
    """

    name: str
    served_model_names: tuple[str, ...]
    source: ModelSource
    version: str = ""
    traffic_weight: int = DEFAULT_TRAFFIC_WEIGHT
    replicas: int | None = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    tensor_parallel_size: int = 1
    tensor_parallel_layout: str = "auto"
    engine_args: tuple[str, ...] = ()
    roles: Roles | None = None
    priority_class_name: str | None = None
    priority: int | None = None
    gpu_tiers: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()
    namespace: str = ""

    @property
    def effective_priority(self) -> int:
        """The priority placement orders by: ``priority``, else the class's, else 0."""
        if self.priority is not None:
            return self.priority
        return PRIORITY_CLASSES.get(self.priority_class_name or "normal", 0)

    @property
    def engine(self) -> EngineArgs:
        """The memory-relevant engine arguments."""
        return EngineArgs.parse(self.engine_args)

    def engine_slots(self, count: int | None = None) -> tuple[tuple[str, str], ...]:
        """The engines this deployment wants, as ``(slot id, role)``.

        Args:
            count: the replica count the autoscaler chose, clamped to ``minReplicas`` ..
                ``maxReplicas`` (default ``minReplicas``); ignored with fixed ``replicas`` or
                ``roles``.

        Returns:
            ``("NAME-0", "both"), ...``, or with roles ``("NAME-prefill-0", "prefill"), ...,
            ("NAME-decode-0", "decode"), ...``.
        """
        if self.roles is not None:
            return tuple(
                (f"{self.name}-prefill-{i}", "prefill") for i in range(self.roles.prefill)
            ) + tuple((f"{self.name}-decode-{i}", "decode") for i in range(self.roles.decode))
        if self.replicas is not None:
            count = self.replicas
        elif count is None:
            count = self.min_replicas or 0
        elif self.min_replicas is not None and self.max_replicas is not None:
            count = max(self.min_replicas, min(self.max_replicas, count))
        return tuple((f"{self.name}-{i}", "both") for i in range(count))

    def to_dict(self) -> dict[str, Any]:
        """The document back, in canonical form: defaults written out, unset options left out.

        ``parse_model(m.to_dict()) == m`` for every model.
        """
        metadata: dict[str, Any] = {"name": self.name}
        if self.namespace:
            metadata["namespace"] = self.namespace
        if self.labels:
            metadata["labels"] = dict(self.labels)
        if self.annotations:
            metadata["annotations"] = dict(self.annotations)
        spec: dict[str, Any] = {
            "servedModelNames": list(self.served_model_names),
            "source": self.source.uri,
        }
        if self.version:
            spec["version"] = self.version
        spec["trafficWeight"] = self.traffic_weight
        if self.roles is not None:
            spec["roles"] = {"prefill": self.roles.prefill, "decode": self.roles.decode}
        elif self.replicas is not None:
            spec["replicas"] = self.replicas
        else:
            spec["minReplicas"] = self.min_replicas
            spec["maxReplicas"] = self.max_replicas
        spec["tensorParallelSize"] = self.tensor_parallel_size
        if self.tensor_parallel_layout != "auto":
            spec["tensorParallelLayout"] = self.tensor_parallel_layout
        spec["engineArgs"] = list(self.engine_args)
        if self.priority_class_name is not None:
            spec["priorityClassName"] = self.priority_class_name
        if self.priority is not None:
            spec["priority"] = self.priority
        if self.gpu_tiers:
            spec["gpuTier"] = list(self.gpu_tiers)
        return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}


def parse_model(doc: object) -> FleetModel:
    """Parse and check one FleetModel document.

    Args:
        doc: the document, as ``yaml.safe_load`` or ``json.loads`` returns it.

    Returns:
        The deployment.

    Raises:
        DeploymentError: every problem of the document, each naming the field path.
    """
    raw_name = doc.get("metadata", {}).get("name") if isinstance(doc, dict) else None
    if isinstance(doc, dict) and not isinstance(doc.get("metadata"), dict):
        raw_name = None
    f = Fields(raw_name if isinstance(raw_name, str) and raw_name else "?")
    top = f.mapping(doc, "", _TOP, required=_TOP)
    if "apiVersion" in top and top["apiVersion"] != API_VERSION:
        f.bad("apiVersion", f"must be {API_VERSION!r}, got {top['apiVersion']!r}")
    if "kind" in top and top["kind"] != KIND:
        f.bad("kind", f"must be {KIND!r}, got {top['kind']!r}")
    if not isinstance(doc, dict):
        raise DeploymentError(f.deployment, f.problems)
    meta: dict[str, Any] = {}
    if "metadata" in top:
        meta = f.mapping(top["metadata"], "metadata", _METADATA, required=("name",))
    spec: dict[str, Any] = {}
    if "spec" in top:
        spec = f.mapping(top["spec"], "spec", SPEC_FIELDS, required=("source",), moved=_MOVED)

    name = f.string(
        meta,
        "name",
        "metadata.name",
        default="",
        pattern=_NAME,
        max_len=63,
        rule="a DNS label (a-z, 0-9, '-', at most 63 characters)",
    )
    namespace = f.string(
        meta,
        "namespace",
        "metadata.namespace",
        default="",
        pattern=_NAME,
        max_len=63,
        rule="a DNS label",
    )
    labels = f.string_map(meta, "labels", "metadata.labels", _label_problem)
    annotations = f.string_map(meta, "annotations", "metadata.annotations", None)

    served = f.strings(
        spec,
        "servedModelNames",
        "spec.servedModelNames",
        default=(name,),
        check=_served_problem,
        unique=True,
        non_empty=True,
    )
    source = ModelSource(uri="", scheme="path", location="")
    if "source" in spec:
        uri = spec["source"]
        if not isinstance(uri, str):
            f.bad("spec.source", f"must be a string, got {uri!r}")
        else:
            try:
                source = ModelSource.parse(uri)
            except ValueError as exc:
                f.bad("spec.source", f"{exc}, got {uri!r}")
    version = f.string(spec, "version", "spec.version", default="", max_len=63)
    weight = f.integer(
        spec,
        "trafficWeight",
        "spec.trafficWeight",
        default=DEFAULT_TRAFFIC_WEIGHT,
        lo=0,
        hi=MAX_TRAFFIC_WEIGHT,
    )
    tp = f.integer(spec, "tensorParallelSize", "spec.tensorParallelSize", default=1, lo=1)
    layout = f.string(spec, "tensorParallelLayout", "spec.tensorParallelLayout", default="auto")
    if layout not in TP_LAYOUTS:
        f.bad(
            "spec.tensorParallelLayout", f"must be one of {', '.join(TP_LAYOUTS)}, got {layout!r}"
        )
    args = f.strings(spec, "engineArgs", "spec.engineArgs", default=(), check=None)
    for where, reason in check_engine_args(args):
        f.bad(f"spec.engineArgs{where}", reason)

    replicas, min_r, max_r, roles = _replicas(f, spec)
    priority_class = None
    if "priorityClassName" in spec:
        priority_class = spec["priorityClassName"]
        if priority_class not in PRIORITY_CLASSES:
            f.bad(
                "spec.priorityClassName",
                f"must be one of {', '.join(PRIORITY_CLASSES)}, got {priority_class!r}",
            )
        if "priority" in spec:
            f.bad("spec.priority", "give either spec.priority or spec.priorityClassName")
    priority = None
    if "priority" in spec:
        lo, hi = PRIORITY_RANGE
        priority = f.integer(spec, "priority", "spec.priority", default=0, lo=lo, hi=hi)
    tiers = f.strings(
        spec,
        "gpuTier",
        "spec.gpuTier",
        default=(),
        unique=True,
        check=lambda t: (
            None
            if _TIER.fullmatch(t)
            else "must be a lower-case tier name (a-z, 0-9, '-', '_', '.')"
        ),
    )
    if f.problems:
        raise DeploymentError(f.deployment, f.problems)
    return FleetModel(
        name=name,
        served_model_names=served,
        source=source,
        version=version,
        traffic_weight=weight,
        replicas=replicas,
        min_replicas=min_r,
        max_replicas=max_r,
        tensor_parallel_size=tp,
        tensor_parallel_layout=layout,
        engine_args=args,
        roles=roles,
        priority_class_name=priority_class if isinstance(priority_class, str) else None,
        priority=priority,
        gpu_tiers=tiers,
        labels=labels,
        annotations=annotations,
        namespace=namespace,
    )


def _replicas(
    f: Fields, spec: dict[str, Any]
) -> tuple[int | None, int | None, int | None, Roles | None]:
    given = [k for k in ("replicas", "minReplicas", "maxReplicas", "roles") if k in spec]
    if "roles" in spec:
        for k in given:
            if k != "roles":
                f.bad(f"spec.{k}", "cannot be combined with spec.roles (roles give the counts)")
        roles = f.mapping(
            spec["roles"], "spec.roles", ("prefill", "decode"), required=("prefill", "decode")
        )
        prefill = f.integer(roles, "prefill", "spec.roles.prefill", default=1, lo=1)
        decode = f.integer(roles, "decode", "spec.roles.decode", default=1, lo=1)
        return None, None, None, Roles(prefill=prefill, decode=decode)
    if "replicas" in spec:
        for k in ("minReplicas", "maxReplicas"):
            if k in spec:
                f.bad(f"spec.{k}", "cannot be combined with spec.replicas")
        return f.integer(spec, "replicas", "spec.replicas", default=1, lo=0), None, None, None
    if "minReplicas" not in spec and "maxReplicas" not in spec:
        return 1, None, None, None
    for k, other in (("minReplicas", "maxReplicas"), ("maxReplicas", "minReplicas")):
        if k not in spec:
            f.bad(f"spec.{k}", f"required with spec.{other}")
    low = f.integer(spec, "minReplicas", "spec.minReplicas", default=0, lo=0)
    high = f.integer(spec, "maxReplicas", "spec.maxReplicas", default=max(low, 1), lo=1)
    if is_int(spec.get("maxReplicas")) and high < low:
        f.bad("spec.maxReplicas", f"must be >= spec.minReplicas ({low}), got {high}")
    return None, low, high, None


def _served_problem(name: str) -> str | None:
    if not name or len(name) > 256 or any(c.isspace() for c in name):
        return "must be 1..256 characters without spaces"
    return None


def _label_problem(key: str, value: str) -> str | None:
    prefix, _, label = key.rpartition("/")
    if not (len(label) <= 63 and _LABEL_NAME.fullmatch(label)) or len(prefix) > 253:
        return "key must be a Kubernetes label name ([prefix/]name, name at most 63 characters)"
    if value and not (len(value) <= 63 and _LABEL_NAME.fullmatch(value)):
        return "value must be a Kubernetes label value (at most 63 characters, A-Z a-z 0-9 -_.)"
    return None


__all__ = [
    "API_VERSION",
    "DEFAULT_TRAFFIC_WEIGHT",
    "KIND",
    "PRIORITY_CLASSES",
    "SPEC_FIELDS",
    "FleetModel",
    "Roles",
    "parse_model",
]
