"""``fleet coordinator --fleetmodels NAMESPACE`` against the test API server (tests/k8sapi).

One coordinator process and one agent with simulated engines; FleetModel objects are created,
scaled, broken and deleted through the official ``kubernetes`` client, and the fleet follows:
engines placed and served by name, ``status`` (desired/ready, the Ready/Placed/Degraded
conditions) written back, an Event when Ready turns, an invalid spec reported on its object,
and a deleted FleetModel kept by Fleet's finalizer until its engines stopped.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from fleet.agent.launcher import free_port

from ..k8sapi import running_emulator
from .fleetproc import stop_process

CRD = Path(__file__).parents[2] / "daemonset" / "crds" / "fleetmodel.yaml"
NS = "models"
WHERE = ("fleet.dev", "v1alpha1", NS, "fleetmodels")
TIMEOUT_S = 60.0  # a safety bound; the printed figures are what the test measured


def _wait(what: str, check: Callable[[], Any]) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < TIMEOUT_S, f"not within {TIMEOUT_S} s: {what}"
        time.sleep(0.1)
    took = time.monotonic() - start
    print(f"{what}: {took:.2f} s")
    return took


class Cluster:
    """The API server's FleetModels and Events, and the coordinator's HTTP API."""

    def __init__(self, api: client.ApiClient, url: str) -> None:
        self.objects = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.url = url

    def create(self, name: str, source: Path, **spec: Any) -> None:
        body = {"apiVersion": "fleet.dev/v1alpha1", "kind": "FleetModel",
                "metadata": {"name": name},
                "spec": {"servedModelNames": [name], "source": str(source), **spec}}  # fmt: skip
        self.objects.create_namespaced_custom_object(*WHERE, body, _request_timeout=5)

    def get(self, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = self.objects.get_namespaced_custom_object(
                *WHERE, name, _request_timeout=5
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    def condition(self, name: str, kind: str) -> tuple[str, str]:
        obj = self.get(name) or {}
        for c in (obj.get("status") or {}).get("conditions") or []:
            if c["type"] == kind:
                return c["status"], c["reason"]
        return "", ""

    def ready(self, name: str, count: int) -> bool:
        status = (self.get(name) or {}).get("status") or {}
        ok = self.condition(name, "Ready") == ("True", "AllReady")
        return ok and status.get("ready") == count == status.get("desired")

    def engines(self) -> set[str]:
        try:
            found = httpx.get(self.url + "/api/v1/engines", timeout=5).json()["engines"]
        except (httpx.HTTPError, ValueError, KeyError):
            return set()
        return {e["id"] for e in found}


@pytest.fixture
def cluster(demo_model: Path, tmp_path: Path) -> Iterator[Cluster]:
    fleet = [sys.executable, "-m", "fleet"]
    http, link = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    with running_emulator() as kube, client.ApiClient(client.Configuration(host=kube)) as api:
        client.ApiextensionsV1Api(api).create_custom_resource_definition(
            yaml.safe_load(CRD.read_text()), _request_timeout=5
        )
        try:
            argv = [*fleet, "coordinator", "--port", str(http), "--agent-endpoint",
                    f"tcp://127.0.0.1:{link}", "--engine", "sim", "--fleetmodels", NS,
                    "--kube-api", kube, "--log-dir", str(tmp_path / "coordinator")]  # fmt: skip
            with open(tmp_path / "coordinator.out", "ab") as out:
                procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True))  # fmt: skip
            with open(tmp_path / "agent.out", "ab") as out:
                procs.append(subprocess.Popen(
                    [*fleet, "agent", "--coordinator", f"tcp://127.0.0.1:{link}", "--node-id",
                     "n1", "--http-port", "0", "--log-dir", str(tmp_path / "agent")],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                ))  # fmt: skip
            yield Cluster(api, f"http://127.0.0.1:{http}")
        finally:
            for proc in procs:
                stop_process(proc)
            print((tmp_path / "coordinator.out").read_text()[-3000:])


def test_fleetmodels_are_served_reported_and_drained_on_delete(
    cluster: Cluster, demo_model: Path
) -> None:
    cluster.create("alpha", demo_model, replicas=1)
    _wait("alpha placed and ready, its status written", lambda: cluster.ready("alpha", 1))
    reply = httpx.post(cluster.url + "/v1/completions", timeout=30,
                       json={"model": "alpha", "prompt": "Hi", "max_tokens": 4})  # fmt: skip
    assert reply.status_code == 200, reply.text
    obj = cluster.get("alpha")
    assert obj is not None
    assert "fleet.dev/drain" in obj["metadata"]["finalizers"]
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    assert {c["type"] for c in obj["status"]["conditions"]} == {"Ready", "Placed", "Degraded"}
    assert cluster.condition("alpha", "Degraded") == ("False", "AsExpected")
    events = cluster.core.list_namespaced_event(NS, _request_timeout=5).items
    assert any(
        e.involved_object.name == "alpha" and e.reason == "AllReady" and e.type == "Normal"
        for e in events
    ), [(e.involved_object.name, e.reason) for e in events]

    # Scaled through the API: the status follows.
    cluster.objects.patch_namespaced_custom_object(
        *WHERE, "alpha", {"spec": {"replicas": 2}}, _request_timeout=5
    )
    _wait("alpha scaled to 2, status ready 2", lambda: cluster.ready("alpha", 2))
    assert cluster.engines() >= {"alpha-0", "alpha-1"}

    # An invalid spec (the emulator does not run the CRD's schema; Fleet's parser does).
    cluster.create("broken", demo_model, replicas=-1)
    _wait(
        "the invalid FleetModel reported Degraded/Invalid",
        lambda: cluster.condition("broken", "Degraded") == ("True", "Invalid"),
    )
    broken = cluster.get("broken")
    assert broken is not None
    assert "spec.replicas" in broken["status"]["conditions"][0]["message"]
    assert not any(e.startswith("broken-") for e in cluster.engines())

    # Deleted: the finalizer holds the object until its engines stopped, then it goes.
    cluster.objects.delete_namespaced_custom_object(*WHERE, "alpha", _request_timeout=5)
    deleting = cluster.get("alpha")
    assert deleting is not None and deleting["metadata"].get("deletionTimestamp")
    _wait("alpha's engines stopped and the object gone", lambda: cluster.get("alpha") is None)
    assert not any(e.startswith("alpha-") for e in cluster.engines())
    models = httpx.get(cluster.url + "/v1/models", timeout=5).json()["data"]
    assert "alpha" not in {m["id"] for m in models}
