"""FleetModel custom resources to deployments and back to their status: sans-I/O.

:func:`parse_resource` turns an object the API server returns (server-set metadata, a status)
into the :class:`~.deployspec.FleetModel` the ``--deployments`` folder would give.
:class:`ResourceCache` holds what a list-then-watch has seen. :func:`resource_status` turns a
deployment's status row (:func:`.deploybook.status`) into the custom resource's ``status``:
desired/placed/ready, the engines, and the conditions ``Ready``, ``Placed`` and ``Degraded``
(each with a reason, a message, and a ``lastTransitionTime`` kept while its status stays).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .deployspec import FleetModel, parse_model
from .errors import DeploymentError

Obj = dict[str, Any]
CONDITIONS = ("Ready", "Placed", "Degraded")
_KEPT_METADATA = ("name", "namespace", "labels", "annotations")
_FAILING = ("failed", "backoff", "unhealthy")  # engine states a Degraded condition names


def parse_resource(obj: Obj) -> FleetModel:
    """The deployment a FleetModel object declares.

    Raises:
        DeploymentError: every problem of its spec, each naming the field.
    """
    meta = obj.get("metadata") or {}
    doc = {k: v for k, v in obj.items() if k in ("apiVersion", "kind", "spec")}
    doc["metadata"] = {k: meta[k] for k in _KEPT_METADATA if meta.get(k) is not None}
    return parse_model(doc)


@dataclass
class ResourceCache:
    """The FleetModels of one namespace, as the last list and the watch events since say."""

    objects: dict[str, Obj] = field(default_factory=dict)  # name -> object

    def replace(self, items: list[Obj]) -> None:
        """A fresh list: forget what it does not hold."""
        self.objects = {o["metadata"]["name"]: o for o in items}

    def apply(self, kind: str, obj: Obj) -> bool:
        """A watch event (ADDED, MODIFIED, DELETED); True when a spec or deletion changed, not
        just the status or the resourceVersion."""
        name = obj["metadata"]["name"]
        old = self.objects.get(name)
        if kind == "DELETED":
            return self.objects.pop(name, None) is not None
        self.objects[name] = obj
        return old is None or _declared(old) != _declared(obj)

    def models(self) -> tuple[list[FleetModel], dict[str, str]]:
        """Every valid, not deleting deployment, and each other object's problem by name."""
        models: list[FleetModel] = []
        problems: dict[str, str] = {}
        for name in sorted(self.objects):
            obj = self.objects[name]
            if obj["metadata"].get("deletionTimestamp"):
                continue  # deleting: its engines drain and stop
            try:
                models.append(parse_resource(obj))
            except DeploymentError as exc:
                problems[name] = str(exc)
        return models, problems


def _declared(obj: Obj) -> tuple[Any, ...]:
    meta = obj.get("metadata") or {}
    return (
        obj.get("spec"),
        meta.get("labels"),
        meta.get("annotations"),
        bool(meta.get("deletionTimestamp")),
    )


def _condition(kind: str, ok: bool, reason: str, message: str) -> Obj:
    return {"type": kind, "status": "True" if ok else "False", "reason": reason, "message": message}


def resource_status(
    row: Mapping[str, Any] | None,
    generation: int,
    previous: Mapping[str, Any] | None,
    now: str,
    problem: str = "",
) -> Obj:
    """The ``status`` of one FleetModel.

    Args:
        row: its :func:`.deploybook.status` row; None when Fleet does not run it (``problem``
            says why).
        generation: the object's ``metadata.generation`` (becomes ``observedGeneration``).
        previous: its current ``status`` (keeps each condition's ``lastTransitionTime`` while
            the condition's status stays).
        now: the time to stamp a transition with (RFC 3339, ``2026-12-07T08:00:00Z``).
        problem: why it is not run (an invalid spec, a name taken elsewhere).
    """
    if row is None:
        conditions = [
            _condition("Ready", False, "Invalid", problem),
            _condition("Placed", False, "Invalid", problem),
            _condition("Degraded", True, "Invalid", problem),
        ]
        body: Obj = {"observedGeneration": generation, "desired": 0, "placed": 0, "ready": 0}
        body["costPerHour"] = 0.0
        body["engines"] = []
    else:
        desired, placed, ready = row["desired"], row["placed"], row["ready"]
        reasons: Mapping[str, str] = row.get("reasons") or {}
        engines = [
            {**e, "reason": reasons[e["id"]]} if e["id"] in reasons else dict(e)
            for e in row["engines"]
        ]
        waiting = "; ".join(f"{e['id']}: {e['reason']}" for e in engines if "reason" in e)
        scaled = reasons.get("deployment", "")
        if desired == 0:
            ready_c = _condition("Ready", True, "ScaledToZero", scaled or "no engine wanted")
        elif ready >= desired:
            ready_c = _condition("Ready", True, "AllReady", f"{ready} of {desired} engines ready")
        else:
            ready_c = _condition(
                "Ready", False, "EnginesNotReady", f"{ready} of {desired} ready; {waiting}"
            )
        unplaced = [e for e in engines if e["state"] == "unplaced"]
        if unplaced:
            why = "; ".join(f"{e['id']}: {e['reason']}" for e in unplaced)
            placed_c = _condition("Placed", False, "Unplaceable", why)
        else:
            placed_c = _condition("Placed", True, "AllPlaced", f"{placed} of {desired} placed")
        failing = [e for e in engines if e["state"] in _FAILING]
        if failing:
            degraded_c = _condition(
                "Degraded",
                True,
                "EngineFailing",
                "; ".join(f"{e['id']}: {e.get('reason', e['state'])}" for e in failing),
            )
        else:
            degraded_c = _condition("Degraded", False, "AsExpected", scaled)
        conditions = [ready_c, placed_c, degraded_c]
        body = {"observedGeneration": generation, "desired": desired, "placed": placed}
        body |= {"ready": ready, "costPerHour": row.get("costPerHour", 0.0), "engines": engines}
    before = {c.get("type"): c for c in (previous or {}).get("conditions") or []}
    for c in conditions:
        old = before.get(c["type"])
        same = old is not None and old.get("status") == c["status"]
        c["lastTransitionTime"] = old.get("lastTransitionTime", now) if same and old else now
    body["conditions"] = conditions
    return body


def same_status(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """Whether two statuses say the same (a write of ``b`` over ``a`` would change nothing)."""
    return (a or {}) == (b or {})


__all__ = ["CONDITIONS", "ResourceCache", "parse_resource", "resource_status", "same_status"]
