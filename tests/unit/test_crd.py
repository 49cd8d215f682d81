"""The FleetModel CustomResourceDefinition (daemonset/crds/fleetmodel.yaml) against Fleet's own
FleetModel parser (fleet.coordinator.deployspec): the same fields, and documents one accepts the
other accepts; wrong values of single fields rejected by both.

The CRD's schema is checked with ``jsonschema`` (OpenAPI v3's structural subset validates alike;
the ``x-kubernetes-*`` extensions and CEL rules are the API server's, so the cross-field rules are
checked only by being present here)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from fleet.coordinator.deployspec import (
    API_VERSION,
    KIND,
    PRIORITY_CLASSES,
    SPEC_FIELDS,
    TP_LAYOUTS,
    parse_model,
)
from fleet.protocol.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CRD = yaml.safe_load((ROOT / "daemonset" / "crds" / "fleetmodel.yaml").read_text())
(VERSION,) = CRD["spec"]["versions"]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]


def _valid(doc: dict[str, Any]) -> bool:
    try:
        jsonschema.validate(doc, SCHEMA)
    except jsonschema.ValidationError:
        return False
    return True


def _doc(**spec: Any) -> dict[str, Any]:
    spec = {"servedModelNames": ["chat"], "source": "hf://org/model@main", **spec}
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "chat-v2"}, "spec": spec}


def _fleet_accepts(doc: dict[str, Any]) -> bool:
    try:
        parse_model(doc)
    except (ConfigError, ValueError):
        return False
    return True


def test_the_crd_names_fleets_group_kind_and_version() -> None:
    group, version = API_VERSION.split("/")
    assert CRD["spec"]["group"] == group and VERSION["name"] == version
    assert CRD["spec"]["names"]["kind"] == KIND
    assert CRD["metadata"]["name"] == f"{CRD['spec']['names']['plural']}.{group}"
    assert VERSION["served"] and VERSION["storage"] and "status" in VERSION["subresources"]


def test_the_spec_fields_are_fleets_own() -> None:
    assert set(SCHEMA["properties"]["spec"]["properties"]) == set(SPEC_FIELDS)
    spec = SCHEMA["properties"]["spec"]["properties"]
    assert set(spec["priorityClassName"]["enum"]) == set(PRIORITY_CLASSES)
    assert tuple(spec["tensorParallelLayout"]["enum"]) == TP_LAYOUTS


def test_documents_fleet_accepts_the_crd_accepts() -> None:
    docs = [
        _doc(),
        _doc(version="v2", trafficWeight=10, replicas=2, tensorParallelSize=2,
             tensorParallelLayout="spread", engineArgs=["--max-model-len=1024"],
             priorityClassName="high", gpuTier=["h100", "a100"]),
        _doc(minReplicas=0, maxReplicas=4, priority=250),
        _doc(roles={"prefill": 1, "decode": 2}),
    ]  # fmt: skip
    docs += [d for d in _examples() if d.get("kind") == KIND]
    for doc in docs:
        assert _fleet_accepts(doc), doc
        assert _valid(doc), doc


def _examples() -> list[dict[str, Any]]:
    """The FleetModel documents of docs/DEPLOYMENTS.md's YAML blocks."""
    text = (ROOT / "docs" / "DEPLOYMENTS.md").read_text()
    out = []
    for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
        out += [d for d in yaml.safe_load_all(block) if isinstance(d, dict)]
    return out


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("servedModelNames", []),
        ("servedModelNames", ["has space"]),
        ("source", ""),
        ("trafficWeight", -1),
        ("trafficWeight", 1_000_001),
        ("replicas", -1),
        ("replicas", "2"),
        ("tensorParallelSize", 0),
        ("tensorParallelLayout", "diagonal"),
        ("engineArgs", "--enforce-eager"),
        ("roles", {"prefill": 0, "decode": 1}),
        ("priorityClassName", "urgent"),
        ("priority", 2_000_000),
        ("gpuTier", ["H100"]),
        ("labels", {"a": "b"}),
    ],
)
def test_a_wrong_field_is_rejected_by_both(field: str, value: Any) -> None:
    doc = _doc(**{field: value})
    assert not _fleet_accepts(doc)
    assert not _valid(doc)


def test_cross_field_rules_are_cel_validations() -> None:
    rules = " ".join(r["rule"] for r in SCHEMA["properties"]["spec"]["x-kubernetes-validations"])
    for field in ("replicas", "minReplicas", "maxReplicas", "roles", "priorityClassName"):
        assert field in rules
    for doc in (_doc(replicas=1, minReplicas=0, maxReplicas=2), _doc(minReplicas=1),
                _doc(priority=1, priorityClassName="low")):  # fmt: skip
        assert not _fleet_accepts(doc)


def test_printer_columns_point_into_the_schema() -> None:
    for column in VERSION["additionalPrinterColumns"]:
        path = column["jsonPath"]
        if path == ".metadata.creationTimestamp":
            continue
        top, field = path.lstrip(".").split(".")[:2]
        field = re.split(r"[\[]", field)[0]
        assert field in SCHEMA["properties"][top]["properties"], path


def test_status_conditions_are_ready_placed_degraded() -> None:
    status = SCHEMA["properties"]["status"]["properties"]
    condition = status["conditions"]["items"]["properties"]
    assert condition["type"]["enum"] == ["Ready", "Placed", "Degraded"]
    assert {"desired", "ready", "engines"} <= set(status)
    deep = copy.deepcopy(_doc())
    deep["status"] = {"desired": 1, "ready": 0, "conditions": [{"type": "Ready", "status": "False",
                      "reason": "EnginesStarting"}]}  # fmt: skip
    assert _valid(deep)
