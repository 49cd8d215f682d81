"""The node scaler's I/O (fleet.coordinator.kubescale) against the test API server.

A real registry, placer and Leadership; the target is a MachineDeployment-like custom
resource on tests/k8sapi's emulator, read and patched through its ``/scale`` by the official
client. Only a failing write is a fake, at Fleet's own seam (:class:`ScaleApi`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException
from prometheus_client import CollectorRegistry

from fleet.coordinator.deployment import Deployment
from fleet.coordinator.kubelease import api_client
from fleet.coordinator.kubescale import NodeScalerMetrics, NodeScaling, ScaleApi
from fleet.coordinator.leadership import Leadership
from fleet.coordinator.nodescale import NodeScaleConfig, ScaleTarget
from fleet.coordinator.placement import Placer
from fleet.coordinator.tpgroups import TPGroups

from ..k8sapi import running_emulator
from ..k8sapi.machinedeployment import (
    GROUP,
    PLURAL,
    VERSION,
    machine_deployment,
    machine_deployment_crd,
)
from .test_placement import Fleet, gpu

NS = "default"
TARGET = ScaleTarget(GROUP, VERSION, PLURAL, NS, "gpu")


@pytest.fixture
def kube() -> Iterator[str]:
    """The emulator's URL, serving the CRD and the target at 1 replica."""
    with running_emulator() as url, client.ApiClient(client.Configuration(host=url)) as api:
        client.ApiextensionsV1Api(api).create_custom_resource_definition(
            machine_deployment_crd(), _request_timeout=5
        )
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            GROUP, VERSION, NS, PLURAL, machine_deployment("gpu", 1), _request_timeout=5
        )
        yield url


def replicas(url: str) -> int:
    with client.ApiClient(client.Configuration(host=url)) as api:
        scale = client.CustomObjectsApi(api).get_namespaced_custom_object_scale(
            GROUP, VERSION, NS, PLURAL, "gpu", _request_timeout=5
        )
    return int(scale["spec"]["replicas"])


def scaling(api: ScaleApi, *, leader: bool = True, dry_run: bool = False) -> NodeScaling:
    """A node scaler for a one-node fleet (2 GPUs) that wants two engines of 2 GPUs."""
    fleet = Fleet()
    fleet.node("n1", gpus=(gpu(0), gpu(1)))
    d = Deployment(model="m", model_path="/m", replicas=2, gpus_per_engine=2)
    placer = Placer((d,), assign_timeout_s=30)
    placer.reconcile(fleet.registry, 0.0)  # m-0 goes to n1; m-1 fits nowhere
    cfg = NodeScaleConfig(TARGET, gpus_per_node=2, max_nodes=4, dry_run=dry_run)
    return NodeScaling(cfg, api, placer=placer, groups=TPGroups(assign_timeout_s=30),
                       registry=fleet.registry, leadership=Leadership(settle_s=0, leader=leader),
                       metrics=NodeScalerMetrics(CollectorRegistry()))  # fmt: skip


def sample(s: NodeScaling, name: str, **labels: str) -> float:
    value = s.metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


async def test_the_leader_patches_the_targets_replicas_once_per_cooldown(kube: str) -> None:
    s = scaling(ScaleApi(api_client(kube), TARGET))
    d = await s.tick()
    assert d is not None and (d.direction, d.current, d.wanted) == ("up", 1, 2)
    assert d.short == ("m-1",) and d.short_gpus == 2
    assert replicas(kube) == 2
    up = {"direction": "up", "dry_run": "false"}
    assert sample(s, "fleet_node_scaler_decisions_total", **up) == 1
    assert sample(s, "fleet_node_scaler_target_replicas") == 1
    assert sample(s, "fleet_node_scaler_gpu_shortfall") == 2
    d = await s.tick()  # still short, within the cool-down
    assert d is not None and (d.direction, d.current) == ("hold", 2)
    assert replicas(kube) == 2 and sample(s, "fleet_node_scaler_decisions_total", **up) == 1


async def test_dry_run_decides_and_counts_but_never_writes(kube: str) -> None:
    s = scaling(ScaleApi(api_client(kube), TARGET), dry_run=True)
    d = await s.tick()
    assert d is not None and (d.direction, d.wanted) == ("up", 2)
    assert replicas(kube) == 1
    dry = {"direction": "up", "dry_run": "true"}
    assert sample(s, "fleet_node_scaler_decisions_total", **dry) == 1
    assert (await s.tick()).direction == "hold"  # type: ignore[union-attr]  # as if it acted


async def test_a_follower_does_nothing(kube: str) -> None:
    s = scaling(ScaleApi(api_client(kube), TARGET), leader=False)
    assert await s.tick() is None
    assert replicas(kube) == 1 and s.last is None


async def test_api_errors_are_counted_and_the_loop_goes_on(kube: str) -> None:
    missing = ScaleTarget(GROUP, VERSION, PLURAL, NS, "nope")
    s = scaling(ScaleApi(api_client(kube), missing))
    assert await s.tick() is None  # 404 on read
    assert sample(s, "fleet_node_scaler_errors_total", operation="read") == 1

    class Refused(ScaleApi):
        def write(self, replicas: int) -> int:
            raise ApiException(status=500, reason="etcd is down")

    s = scaling(Refused(api_client(kube), TARGET))
    d = await s.tick()
    assert d is not None and d.direction == "up"
    assert sample(s, "fleet_node_scaler_errors_total", operation="write") == 1
    assert replicas(kube) == 1
    again = await s.tick()  # not applied: no cool-down, decided again
    assert again is not None and again.direction == "up"
    assert sample(s, "fleet_node_scaler_errors_total", operation="write") == 2


def test_a_scale_that_is_no_scale_is_an_error(kube: str) -> None:
    api: Any = ScaleApi(api_client(kube), TARGET)
    assert api.read() == 1
    api.api.get_namespaced_custom_object_scale = lambda *a, **k: {"spec": {}}
    with pytest.raises(ValueError, match="spec.replicas"):
        api.read()
