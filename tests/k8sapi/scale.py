"""The ``/scale`` subresource of custom resources, as apiextensions-apiserver serves it.

Mixed into :class:`.emulator.KubernetesEmulator` (the module docstring there says what is
emulated); it uses the emulator's store (``_store``, ``_kinds``) and its ``_update``.
Reference: kubernetes' staging/src/k8s.io/apiextensions-apiserver/pkg/registry/customresource
``etcd.go`` (ScaleREST, scaleFromCustomResource, scaleUpdatedObjectInfo) and ``validator.go``
(ValidateScaleSpec, ValidateScaleStatus).
"""

import copy
from typing import Any, NoReturn

import kmock

from .wire import ApiError, Obj, merge_patch

INT32_MAX = 2**31 - 1
CRDS = ("apiextensions.k8s.io", "customresourcedefinitions")
Key = tuple[str, str, str | None, str]  # group, plural, namespace, name


def nested(obj: Obj, path: str) -> tuple[Any, bool]:
    """The value at a CRD's dotted JSON path (``.spec.replicas``) and whether it is there."""
    value: Any = obj
    for part in path.removeprefix(".").split("."):
        if not isinstance(value, dict):
            raise ValueError(f"{path} accessor error: {value!r} is not a map")
        if part not in value:
            return None, False
        value = value[part]
    return value, True


def nested_int(obj: Obj, path: str) -> int | None:
    """The integer at ``path`` (None when absent), as unstructured.NestedInt64 reads it."""
    value, found = nested(obj, path)
    if found and type(value) is not int:  # JSON true and 1.0 are no int64 either
        kind = type(value).__name__
        raise ValueError(f"{path} accessor error: {value!r} is of the type {kind}, not int64")
    return value if found else None


class ScaleSubresource:
    """``/scale`` of custom resources whose CRD declares ``subresources.scale``."""

    _store: dict[Key, Obj]
    _kinds: dict[tuple[str, str], str]

    def _update(self, key: Key, old: Obj, body: Obj, version: str | None, status_only: bool) -> Obj:
        raise NotImplementedError  # the emulator's

    def _scale_paths(self, gp: tuple[str, str], version: str | None) -> dict[str, str] | None:
        """The CRD's ``subresources.scale`` for ``version`` (None: it declares none)."""
        crd = self._store.get((*CRDS, None, f"{gp[1]}.{gp[0]}"))
        for v in (crd or {}).get("spec", {}).get("versions", []):
            if v["name"] == version:
                scale = (v.get("subresources") or {}).get("scale")
                return scale if isinstance(scale, dict) else None
        return None

    def _check_replicas(self, gp: tuple[str, str], version: str | None, obj: Obj) -> None:
        """validator.go's ValidateScaleSpec/ValidateScaleStatus on a write of the parent:
        the replicas paths hold a non-negative int32 (or nothing)."""
        scale = self._scale_paths(gp, version)
        for path in (scale["specReplicasPath"], scale["statusReplicasPath"]) if scale else ():
            try:
                value = nested_int(obj, path)
            except ValueError as e:
                self._invalid(gp, obj, f"{path}: Invalid value: {e}")
            if value is not None and not 0 <= value <= INT32_MAX:
                why = f"should be a non-negative integer up to {INT32_MAX}"
                self._invalid(gp, obj, f"{path}: Invalid value: {value}: {why}")

    def _invalid(self, gp: tuple[str, str], obj: Obj, detail: str) -> NoReturn:
        kind = self._kinds.get(gp) or obj.get("kind", "")
        name = (obj.get("metadata") or {}).get("name", "")
        raise ApiError(422, "Invalid", f'{kind}.{gp[0]} "{name}" is invalid: {detail}')

    def _scale_of(self, obj: Obj, paths: dict[str, str]) -> tuple[Obj, bool]:
        """The parent as an autoscaling/v1 Scale, and whether spec.replicas was there
        (etcd.go's scaleFromCustomResource).

        Raises:
            ValueError: a path holds something else than an integer (or a string selector).
        """
        spec = nested_int(obj, paths["specReplicasPath"])
        status = nested_int(obj, paths["statusReplicasPath"]) or 0
        selector = ""
        if paths.get("labelSelectorPath"):
            value, found = nested(obj, paths["labelSelectorPath"])
            if found and not isinstance(value, str):
                raise ValueError(f"{paths['labelSelectorPath']}: {value!r} is not a string")
            selector = value if found else ""
        keep = ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
        scale = {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {k: v for k, v in obj["metadata"].items() if k in keep},
            "spec": {"replicas": spec or 0},
            "status": {"replicas": status, "selector": selector},
        }
        return scale, spec is not None

    def _serve_scale(
        self, request: kmock.Request, key: Key, old: Obj, paths: dict[str, str]
    ) -> tuple[int, Obj]:
        """GET, PUT or merge PATCH of a custom resource's /scale (module docstring)."""
        method = request.method
        try:
            current, found = self._scale_of(old, paths)
        except ValueError as e:
            raise ApiError(500, "InternalError", str(e)) from None
        if method == "GET":
            if not found:
                field = paths["specReplicasPath"]
                raise ApiError(500, "InternalError", f'the spec replicas field "{field}" is absent')
            return 200, current
        if method == "PATCH" and not isinstance(request.data, dict):
            raise ApiError(415, "UnsupportedMediaType", "only merge patches are emulated")
        if method not in ("PATCH", "PUT"):
            raise ApiError(405, "MethodNotAllowed", f"{method} on /scale is not emulated")
        if not found:
            del current["spec"]["replicas"]  # a patch must set it
        body = merge_patch(current, request.data) if method == "PATCH" else request.data
        # What decoding into an autoscaling/v1 Scale rejects: 422 for a patch (patch.go),
        # 400 for a PUT body (the update handler's decode error).
        bad = 422 if method == "PATCH" else 400
        reason = "Invalid" if method == "PATCH" else "BadRequest"
        if not isinstance(body, dict):
            raise ApiError(bad, reason, "the body must be a JSON object")
        meta, spec = body.get("metadata") or {}, body.get("spec") or {}
        replicas, rv = spec.get("replicas"), meta.get("resourceVersion")
        kind = (body.get("apiVersion"), body.get("kind"))
        if kind not in ((None, None), ("autoscaling/v1", "Scale")):
            raise ApiError(bad, reason, f"the body must be an autoscaling/v1 Scale, not {kind}")
        if replicas is not None and (type(replicas) is not int or abs(replicas) > INT32_MAX):
            raise ApiError(bad, reason, f"spec.replicas: cannot decode {replicas!r} as an int32")
        if rv is not None and not isinstance(rv, str):
            raise ApiError(bad, reason, "metadata.resourceVersion must be a string")
        if meta.get("name") != request.name:
            raise ApiError(400, "BadRequest", f"the name of the object ({meta.get('name')}) "
                           f"does not match the name on the URL ({request.name})")  # fmt: skip
        if replicas is None:
            field = paths["specReplicasPath"]
            raise ApiError(400, "BadRequest", f'the spec replicas field "{field}" cannot be empty')
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {key[1]}.{key[0]} "{request.name}": the '
                "object has been modified; please apply your changes to the latest version "
                "and try again",
            )
        new = copy.deepcopy(old)
        *parents, leaf = paths["specReplicasPath"].removeprefix(".").split(".")
        where = new
        for part in parents:
            where = where.setdefault(part, {})
            if not isinstance(where, dict):
                raise ApiError(500, "InternalError", f"{part} of the parent is not a map")
        where[leaf] = replicas
        res = request.resource
        updated = self._update(key, old, new, res.version if res else None, False)
        return 200, self._scale_of(updated, paths)[0]


__all__ = ["INT32_MAX", "ScaleSubresource", "nested", "nested_int"]
