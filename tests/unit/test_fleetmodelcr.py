"""FleetModel resources to deployments and back to status (coordinator/fleetmodelcr.py), and
the deployment book's FleetModel part."""

from __future__ import annotations

from typing import Any

import pytest

from fleet.coordinator.deploybook import API, CLUSTER, DeploymentBook
from fleet.coordinator.deployspec import parse_model
from fleet.coordinator.errors import DeploymentError
from fleet.coordinator.fleetmodelcr import ResourceCache, parse_resource, resource_status


def obj(name: str, rv: int = 1, **spec: Any) -> dict[str, Any]:
    """A FleetModel as the API server returns it: server-set metadata and a status."""
    return {
        "apiVersion": "fleet.dev/v1alpha1",
        "kind": "FleetModel",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": "u-1",
            "generation": 3,
            "resourceVersion": str(rv),
            "creationTimestamp": "2026-12-07T08:00:00Z",
            "finalizers": ["fleet.dev/drain"],
            "managedFields": [{}],
        },  # fmt: skip
        "spec": {"source": "hf://org/m", **spec},
        "status": {"ready": 1},
    }


def row(desired: int, ready: int, engines: list[tuple[str, str]], **reasons: str) -> dict[str, Any]:
    return {
        "name": "m",
        "desired": desired,
        "placed": sum(1 for _, s in engines if s != "unplaced"),
        "ready": ready,
        "engines": [
            {"id": i, "node": "n1" if s != "unplaced" else "", "state": s} for i, s in engines
        ],  # fmt: skip
        "reasons": reasons,
    }


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_a_resource_parses_as_its_folder_document_would() -> None:
    model = parse_resource(obj("chat", replicas=2))
    doc = {"apiVersion": "fleet.dev/v1alpha1", "kind": "FleetModel",
           "metadata": {"name": "chat", "namespace": "ns"},
           "spec": {"source": "hf://org/m", "replicas": 2}}  # fmt: skip
    assert model == parse_model(doc)


def test_a_bad_spec_raises_naming_the_field() -> None:
    with pytest.raises(DeploymentError, match=r"spec\.replicas"):
        parse_resource(obj("chat", replicas=-1))


def test_the_cache_reports_spec_changes_not_status_writes() -> None:
    cache = ResourceCache()
    cache.replace([obj("a")])
    assert not cache.apply("MODIFIED", {**obj("a", rv=2), "status": {"ready": 2}})
    assert cache.objects["a"]["metadata"]["resourceVersion"] == "2"
    assert cache.apply("MODIFIED", obj("a", rv=3, replicas=3))
    assert cache.apply("ADDED", obj("b", rv=4))
    deleting = obj("b", rv=5)
    deleting["metadata"]["deletionTimestamp"] = "2026-12-07T09:00:00Z"
    assert cache.apply("MODIFIED", deleting)
    models, problems = cache.models()
    assert [m.name for m in models] == ["a"] and problems == {}  # b is deleting
    assert cache.apply("DELETED", deleting)
    assert not cache.apply("DELETED", deleting)
    cache.apply("ADDED", obj("bad", rv=6, replicas=-1))
    models, problems = cache.models()
    assert [m.name for m in models] == ["a"] and "spec.replicas" in problems["bad"]


def test_status_of_a_ready_deployment() -> None:
    status = resource_status(row(2, 2, [("m-0", "ready"), ("m-1", "ready")]), 3, None, "T1")
    assert status["observedGeneration"] == 3
    assert (status["desired"], status["placed"], status["ready"]) == (2, 2, 2)
    assert conditions(status) == {
        "Ready": ("True", "AllReady"),
        "Placed": ("True", "AllPlaced"),
        "Degraded": ("False", "AsExpected"),
    }
    assert all(c["lastTransitionTime"] == "T1" for c in status["conditions"])


def test_status_names_why_engines_are_not_ready_or_not_placed() -> None:
    r = row(3, 1, [("m-0", "ready"), ("m-1", "backoff"), ("m-2", "unplaced")],
            **{"m-1": "backoff on node n1: exited with 1",
               "m-2": "needs 2 free GPUs on one node; most: node n1 has 1"})  # fmt: skip
    status = resource_status(r, 1, None, "T1")
    c = {x["type"]: x for x in status["conditions"]}
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("False", "EnginesNotReady")
    assert (
        "1 of 3 ready" in c["Ready"]["message"]
        and "m-2: needs 2 free GPUs" in (c["Ready"]["message"])
    )
    assert (c["Placed"]["status"], c["Placed"]["reason"]) == ("False", "Unplaceable")
    assert c["Placed"]["message"].startswith("m-2: needs 2 free GPUs")
    assert (c["Degraded"]["status"], c["Degraded"]["reason"]) == ("True", "EngineFailing")
    assert "exited with 1" in c["Degraded"]["message"]
    assert status["engines"][1]["reason"] == "backoff on node n1: exited with 1"
    assert "reason" not in status["engines"][0]


def test_scaled_to_zero_is_ready() -> None:
    status = resource_status(row(0, 0, [], deployment="scaled to zero: idle 300 s"), 1, None, "T")
    assert conditions(status)["Ready"] == ("True", "ScaledToZero")


def test_an_invalid_resource_is_degraded_with_its_problem() -> None:
    status = resource_status(None, 2, None, "T", "spec.replicas: must be >= 0")
    assert conditions(status) == {
        "Ready": ("False", "Invalid"),
        "Placed": ("False", "Invalid"),
        "Degraded": ("True", "Invalid"),
    }
    assert status["conditions"][0]["message"] == "spec.replicas: must be >= 0"


def test_transition_times_stay_while_a_condition_keeps_its_status() -> None:
    first = resource_status(row(1, 0, [("m-0", "starting")], **{"m-0": "starting"}), 1, None, "T1")
    same = resource_status(row(1, 0, [("m-0", "starting")], **{"m-0": "starting"}), 1, first, "T2")
    assert same == first  # nothing to write
    ready = resource_status(row(1, 1, [("m-0", "ready")]), 1, first, "T3")
    times = {c["type"]: c["lastTransitionTime"] for c in ready["conditions"]}
    assert times == {"Ready": "T3", "Placed": "T1", "Degraded": "T1"}


def test_the_book_takes_resources_and_reports_names_taken_elsewhere() -> None:
    book = DeploymentBook()
    api = parse_resource(obj("api-one"))
    book.put(api, API)
    problems = book.set_cluster([parse_resource(obj("a")), parse_resource(obj("api-one"))])
    assert problems == {"api-one": "metadata.name: 'api-one' is declared by api"}
    assert [(origin, m.name) for origin, m in book.models()] == [(CLUSTER, "a"), (API, "api-one")]
    assert book.set_cluster([]) == {}
    assert [m.name for _, m in book.models()] == ["api-one"]  # the API's stays
    book.set_cluster([parse_resource(obj("a"))])
    book.set_folder((), {})  # a folder re-read keeps the resources
    assert [m.name for _, m in book.models()] == ["a", "api-one"]
