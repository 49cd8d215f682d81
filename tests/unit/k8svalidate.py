"""Kubernetes objects checked offline, two independent ways.

* :func:`schema_error`: against the API server's OpenAPI schemas, as bundled by
  ``kubernetes-validate`` (strict: an unknown field is an error), for each of
  :data:`KUBERNETES_VERSIONS`. No network: the schemas ship inside the package.
* :func:`model_error`: through the official ``kubernetes`` client's models. The client is
  lenient on input (it drops unknown fields, converts ``"2"`` to ``2``), so the object is
  deserialized and serialized back, and anything that did not survive unchanged is an error.
"""

from __future__ import annotations

import json
from typing import Any

import kubernetes.client
import kubernetes_validate

# The oldest Kubernetes the manifests promise to work with, and the newest schemas at hand.
KUBERNETES_VERSIONS = ("1.29", "1.37")

Obj = dict[str, Any]


def model_name(obj: Obj) -> str:
    """The client's model class for ``obj``: ``apps/v1`` ``Deployment`` -> ``V1Deployment``."""
    version = str(obj["apiVersion"]).rsplit("/", 1)[-1]
    return f"{version[:1].upper()}{version[1:]}{obj['kind']}"


def schema_error(obj: Obj) -> str | None:
    """Why the API server's schema rejects ``obj`` (None: every version accepts it)."""
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            return f"Kubernetes {version}: {exc}"
        except kubernetes_validate.SchemaNotFoundError as exc:
            return f"Kubernetes {version}: no schema: {exc}"
    return None


def model_error(obj: Obj) -> str | None:
    """Why the ``kubernetes`` client's models do not take ``obj`` as it is (None: they do)."""
    name = model_name(obj)
    if not hasattr(kubernetes.client, name):
        return f"the kubernetes client has no model {name}"
    api = kubernetes.client.ApiClient()
    try:
        model = api._ApiClient__deserialize(obj, name)  # type: ignore[attr-defined]
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        return f"{name}: {exc}"
    back = api.sanitize_for_serialization(model)  # type: ignore[no-untyped-call]
    if back != obj:
        return f"{name} changes it: {_first_difference(obj, back)}"
    return None


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys()):
            if key not in b:
                return f"{path}.{key} dropped (unknown field?)"
            if key not in a:
                return f"{path}.{key} added"
            if a[key] != b[key]:
                return _first_difference(a[key], b[key], f"{path}.{key}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return f"{path or '.'}: {json.dumps(a)} became {json.dumps(b, default=str)}"


__all__ = ["KUBERNETES_VERSIONS", "model_error", "model_name", "schema_error"]
