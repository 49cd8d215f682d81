"""tests/k8sapi's emulator against the Kubernetes API conventions, through the official client.

Each extension to kmock gets a test of its own, so the stand-in never becomes more forgiving
than a real API server. Everything goes over real HTTP on loopback.
"""

import contextlib
import json
import pathlib
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client, watch
from kubernetes.client.rest import ApiException
from kubernetes.leaderelection import electionconfig, leaderelection
from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

from ..k8sapi import running_emulator
from ..k8sapi.machinedeployment import (
    GROUP,
    PLURAL,
    VERSION,
    machine_deployment,
    machine_deployment_crd,
)

CRD = pathlib.Path(__file__).parents[2] / "daemonset" / "crds" / "fleetmodel.yaml"
NS = "fleet"
TIMEOUT = 5  # seconds, for every request


@pytest.fixture
def api() -> Iterator[client.ApiClient]:
    with running_emulator() as url, client.ApiClient(client.Configuration(host=url)) as api:
        yield api


def lease(name: str, holder: str = "a", labels: dict[str, str] | None = None) -> client.V1Lease:
    meta = client.V1ObjectMeta(name=name, labels=labels)
    return client.V1Lease(metadata=meta, spec=client.V1LeaseSpec(holder_identity=holder))


def status_of(e: pytest.ExceptionInfo[ApiException]) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(e.value.body)
    assert body["kind"] == "Status" and body["apiVersion"] == "v1"
    assert body["status"] == "Failure" and body["code"] == e.value.status
    return body


class FleetModels:
    """The FleetModel CRD, created through the client, and its custom objects."""

    def __init__(self, api: client.ApiClient) -> None:
        crd = yaml.safe_load(CRD.read_text())
        client.ApiextensionsV1Api(api).create_custom_resource_definition(
            crd, _request_timeout=TIMEOUT
        )
        self.objects = client.CustomObjectsApi(api)
        self.where = ("fleet.dev", "v1alpha1", NS, "fleetmodels")

    def create(self, name: str, **extra: Any) -> dict[str, Any]:
        body = {"apiVersion": "fleet.dev/v1alpha1", "kind": "FleetModel"}
        body |= {"metadata": {"name": name}, "spec": {"source": "hf://m"}, **extra}
        obj: dict[str, Any] = self.objects.create_namespaced_custom_object(
            *self.where, body, _request_timeout=TIMEOUT
        )
        return obj

    def __getattr__(self, verb: str) -> Any:  # patch_status -> patch_..._custom_object_status
        base, _, status = verb.partition("_")
        suffix = f"_{status}" if status else ""
        method = getattr(self.objects, f"{base}_namespaced_custom_object{suffix}")
        return lambda *args: method(*self.where, *args, _request_timeout=TIMEOUT)


def test_create_answers_201_with_server_set_metadata(api: client.ApiClient) -> None:
    leases = client.CoordinationV1Api(api)
    obj, code, _ = leases.create_namespaced_lease_with_http_info(
        NS, lease("one"), _request_timeout=TIMEOUT
    )
    assert code == 201
    assert obj.metadata.namespace == NS and obj.metadata.uid and obj.metadata.generation == 1
    assert obj.metadata.creation_timestamp is not None
    other = leases.create_namespaced_lease(NS, lease("two"), _request_timeout=TIMEOUT)
    assert int(other.metadata.resource_version) > int(obj.metadata.resource_version)
    assert other.metadata.uid != obj.metadata.uid


def test_create_of_an_existing_name_is_409_already_exists(api: client.ApiClient) -> None:
    leases = client.CoordinationV1Api(api)
    leases.create_namespaced_lease(NS, lease("one"), _request_timeout=TIMEOUT)
    with pytest.raises(ApiException) as e:
        leases.create_namespaced_lease(NS, lease("one", holder="b"), _request_timeout=TIMEOUT)
    assert e.value.status == 409 and status_of(e)["reason"] == "AlreadyExists"
    assert leases.read_namespaced_lease("one", NS).spec.holder_identity == "a"


def test_get_of_a_missing_object_is_404_not_found(api: client.ApiClient) -> None:
    with pytest.raises(ApiException) as e:
        client.CoordinationV1Api(api).read_namespaced_lease("nope", NS, _request_timeout=TIMEOUT)
    assert e.value.status == 404 and status_of(e)["reason"] == "NotFound"


def test_list_of_an_empty_resource_is_an_empty_list(api: client.ApiClient) -> None:
    listed = client.CoordinationV1Api(api).list_namespaced_lease(NS, _request_timeout=TIMEOUT)
    assert listed.items == [] and listed.metadata.resource_version is not None
    models = FleetModels(api)
    assert models.list()["items"] == []


def test_replace_with_a_stale_resource_version_is_409_conflict(api: client.ApiClient) -> None:
    leases = client.CoordinationV1Api(api)
    leases.create_namespaced_lease(NS, lease("one"), _request_timeout=TIMEOUT)
    seen = leases.read_namespaced_lease("one", NS, _request_timeout=TIMEOUT)
    seen.spec.holder_identity = "b"
    replaced = leases.replace_namespaced_lease("one", NS, seen, _request_timeout=TIMEOUT)
    assert replaced.spec.holder_identity == "b"
    assert int(replaced.metadata.resource_version) > int(seen.metadata.resource_version)
    assert replaced.metadata.uid == seen.metadata.uid

    seen.spec.holder_identity = "c"  # still carries the resourceVersion read before "b"
    with pytest.raises(ApiException) as e:
        leases.replace_namespaced_lease("one", NS, seen, _request_timeout=TIMEOUT)
    assert e.value.status == 409 and status_of(e)["reason"] == "Conflict"
    stale = {"metadata": {"resourceVersion": seen.metadata.resource_version}}
    with pytest.raises(ApiException) as e:
        leases.patch_namespaced_lease("one", NS, stale, _request_timeout=TIMEOUT)
    assert e.value.status == 409 and status_of(e)["reason"] == "Conflict"
    assert leases.read_namespaced_lease("one", NS).spec.holder_identity == "b"

    # Without a resourceVersion a write is unconditional, as on a real server.
    patched = leases.patch_namespaced_lease(
        "one", NS, {"spec": {"holderIdentity": "d"}}, _request_timeout=TIMEOUT
    )
    assert patched.spec.holder_identity == "d"


def test_a_no_op_write_keeps_the_resource_version(api: client.ApiClient) -> None:
    leases = client.CoordinationV1Api(api)
    made = leases.create_namespaced_lease(NS, lease("one"), _request_timeout=TIMEOUT)
    same = leases.replace_namespaced_lease("one", NS, made, _request_timeout=TIMEOUT)
    assert same.metadata.resource_version == made.metadata.resource_version


def test_generation_follows_spec_changes_only(api: client.ApiClient) -> None:
    models = FleetModels(api)
    assert models.create("m")["metadata"]["generation"] == 1
    labelled = models.patch("m", {"metadata": {"labels": {"team": "x"}}})
    assert labelled["metadata"]["generation"] == 1
    assert labelled["metadata"]["labels"] == {"team": "x"}
    status = models.patch_status("m", {"status": {"ready": 1}})
    assert status["metadata"]["generation"] == 1
    respec = models.patch("m", {"spec": {"replicas": 2}})
    assert respec["metadata"]["generation"] == 2


def test_status_subresource_of_a_custom_resource(api: client.ApiClient) -> None:
    models = FleetModels(api)
    made = models.create("m", status={"ready": 5})
    assert "status" not in made  # a create ignores status when /status exists

    # /status writes change only status.
    patched = models.patch_status("m", {"spec": {"source": "hf://x"}, "status": {"ready": 1}})
    assert patched["spec"] == {"source": "hf://m"} and patched["status"] == {"ready": 1}
    body = dict(patched, spec={"source": "hf://y"}, status={"ready": 2})
    replaced = models.replace_status("m", body)
    assert replaced["spec"] == {"source": "hf://m"} and replaced["status"] == {"ready": 2}

    # Writes to the main resource do not change status.
    body = dict(replaced, spec={"source": "hf://z"}, status={"ready": 9})
    main = models.replace("m", body)
    assert main["spec"] == {"source": "hf://z"} and main["status"] == {"ready": 2}
    main = models.patch("m", {"status": {"ready": 9}})
    assert main["status"] == {"ready": 2}

    # ... and the stale-write rule holds on /status too.
    with pytest.raises(ApiException) as e:
        models.replace_status("m", dict(replaced, status={"ready": 3}))
    assert e.value.status == 409 and status_of(e)["reason"] == "Conflict"


def test_without_a_status_subresource_status_is_an_ordinary_field(
    api: client.ApiClient,
) -> None:
    crd = yaml.safe_load(CRD.read_text())
    del crd["spec"]["versions"][0]["subresources"]
    client.ApiextensionsV1Api(api).create_custom_resource_definition(crd)
    objects = client.CustomObjectsApi(api)
    where = ("fleet.dev", "v1alpha1", NS, "fleetmodels")
    body = {"metadata": {"name": "m"}, "spec": {"source": "hf://m"}, "status": {"ready": 1}}
    assert objects.create_namespaced_custom_object(*where, body)["status"] == {"ready": 1}
    patched = objects.patch_namespaced_custom_object(*where, "m", {"status": {"ready": 2}})
    assert patched["status"] == {"ready": 2}
    assert patched["metadata"]["generation"] == 2  # everything but metadata counts as spec
    with pytest.raises(ApiException) as e:
        objects.patch_namespaced_custom_object_status(*where, "m", {"status": {"ready": 3}})
    assert e.value.status == 404 and status_of(e)["reason"] == "NotFound"


def test_generate_name_and_finalizers(api: client.ApiClient) -> None:
    models = FleetModels(api)
    made = models.create("", metadata={"generateName": "m-", "finalizers": ["fleet.dev/x"]})
    name = made["metadata"]["name"]
    assert name.startswith("m-") and len(name) > len("m-")
    marked = models.delete(name)  # a finalizer holds the object, marked for deletion
    assert marked["metadata"]["deletionTimestamp"]
    assert models.get(name)["metadata"]["deletionTimestamp"]
    models.patch(name, {"metadata": {"finalizers": None}})  # the last finalizer goes: deleted
    with pytest.raises(ApiException) as e:
        models.get(name)
    assert e.value.status == 404


def watch_events(list_fn: Any, *args: Any, **kwargs: Any) -> Iterator[tuple[str, Any]]:
    stream = watch.Watch().stream(list_fn, *args, _request_timeout=TIMEOUT, **kwargs)
    for event in stream:
        yield event["type"], event["object"].metadata.name


def test_watch_from_a_resource_version_sees_only_later_events(api: client.ApiClient) -> None:
    leases = client.CoordinationV1Api(api)
    leases.create_namespaced_lease(NS, lease("old"), _request_timeout=TIMEOUT)
    since = leases.create_namespaced_lease(NS, lease("mark"), _request_timeout=TIMEOUT)
    leases.patch_namespaced_lease("mark", NS, {"spec": {"holderIdentity": "b"}})
    leases.create_namespaced_lease(NS, lease("new"), _request_timeout=TIMEOUT)
    leases.delete_namespaced_lease("old", NS, _request_timeout=TIMEOUT)
    rv = since.metadata.resource_version
    events = list(
        watch_events(leases.list_namespaced_lease, NS, resource_version=rv, timeout_seconds=1)
    )
    assert events == [("MODIFIED", "mark"), ("ADDED", "new"), ("DELETED", "old")]


def test_watch_replays_then_streams_and_ends_at_timeout_seconds(api: client.ApiClient) -> None:
    leases = client.CoordinationV1Api(api)
    leases.create_namespaced_lease(NS, lease("old"), _request_timeout=TIMEOUT)
    started = time.monotonic()
    events = []
    for event in watch_events(leases.list_namespaced_lease, NS, timeout_seconds=1):
        events.append(event)
        if event == ("ADDED", "old"):  # live: an event made after the watch began
            leases.create_namespaced_lease(NS, lease("live"), _request_timeout=TIMEOUT)
    elapsed = time.monotonic() - started
    assert events == [("ADDED", "old"), ("ADDED", "live")]
    assert 0.9 <= elapsed < 3  # ended by timeoutSeconds, not by the client's request timeout


def test_label_and_field_selectors_on_list_and_watch(api: client.ApiClient) -> None:
    leases = client.CoordinationV1Api(api)
    for name, labels in [("a", {"app": "x", "tier": "1"}), ("b", {"app": "y"}), ("c", None)]:
        leases.create_namespaced_lease(NS, lease(name, labels=labels), _request_timeout=TIMEOUT)
    leases.create_namespaced_lease("other", lease("d", labels={"app": "x"}))

    def names(**selectors: str) -> list[str]:
        listed = leases.list_lease_for_all_namespaces(_request_timeout=TIMEOUT, **selectors)
        return sorted(item.metadata.name for item in listed.items)

    assert names(label_selector="app=x") == ["a", "d"]
    assert names(label_selector="app==x") == ["a", "d"]
    assert names(label_selector="app!=x") == ["b", "c"]  # absent counts as "not x"
    assert names(label_selector="app") == ["a", "b", "d"]
    assert names(label_selector="!app") == ["c"]
    assert names(label_selector="app=x,tier") == ["a"]
    assert names(field_selector="metadata.name=b") == ["b"]
    assert names(field_selector="metadata.namespace!=fleet") == ["d"]
    assert names(field_selector="metadata.namespace==fleet", label_selector="app=x") == ["a"]
    with pytest.raises(ApiException) as e:
        names(field_selector="spec.holderIdentity=a")
    assert e.value.status == 400 and status_of(e)["reason"] == "BadRequest"

    kw: dict[str, Any] = {"label_selector": "app=y", "timeout_seconds": 1}
    watched = list(watch_events(leases.list_namespaced_lease, NS, **kw))
    assert watched == [("ADDED", "b")]
    kw = {"field_selector": "metadata.name=c", "timeout_seconds": 1}
    rv = leases.list_namespaced_lease(NS).metadata.resource_version
    leases.patch_namespaced_lease("b", NS, {"spec": {"holderIdentity": "z"}})
    leases.patch_namespaced_lease("c", NS, {"spec": {"holderIdentity": "z"}})
    watched = list(watch_events(leases.list_namespaced_lease, NS, resource_version=rv, **kw))
    assert watched == [("MODIFIED", "c")]


class Stopped(Exception):
    """Raised inside a candidate's thread to end `LeaderElection.run()`, which never returns."""


class StoppableLeaseLock(LeaseLock):
    def __init__(self, identity: str, api: client.ApiClient) -> None:
        super().__init__("fleet-leader", NS, identity)
        self.api_instance.api_client.close()  # the default client LeaseLock made for itself
        self.api_instance = client.CoordinationV1Api(api)
        self.stop = threading.Event()

    def get(self, name: str, namespace: str) -> Any:
        if self.stop.is_set():  # stop renewing (a crashed or partitioned leader)
            raise Stopped
        return super().get(name, namespace)


@contextlib.contextmanager
def candidate(identity: str, api: client.ApiClient, leaders: queue.Queue[str]) -> Iterator[Any]:
    lock = StoppableLeaseLock(identity, api)
    # The client's minimum: retry 1 s; deadline > 1.2 * retry; lease > deadline (whole seconds).
    config = electionconfig.Config(
        lock,
        lease_duration=3,
        renew_deadline=2,
        retry_period=1,
        onstarted_leading=lambda: leaders.put(identity),
        onstopped_leading=lambda: None,
    )

    def run() -> None:
        with contextlib.suppress(Stopped):
            leaderelection.LeaderElection(config).run()

    thread = threading.Thread(target=run, name=f"candidate-{identity}", daemon=True)
    thread.start()
    try:
        yield lock
    finally:
        lock.stop.set()
        thread.join(TIMEOUT)
        assert not thread.is_alive()


def test_leader_election_yields_one_leader_and_fails_over(api: client.ApiClient) -> None:
    leaders: queue.Queue[str] = queue.Queue()
    with candidate("a", api, leaders) as a, candidate("b", api, leaders) as b:
        first = leaders.get(timeout=10)
        with pytest.raises(queue.Empty):  # two renewals later still no second leader
            leaders.get(timeout=2.2)
        held = client.CoordinationV1Api(api).read_namespaced_lease("fleet-leader", NS)
        assert held.spec.holder_identity == first

        {"a": a, "b": b}[first].stop.set()  # the leader stops renewing
        second = leaders.get(timeout=10)
        assert second != first
        held = client.CoordinationV1Api(api).read_namespaced_lease("fleet-leader", NS)
        assert held.spec.holder_identity == second


class MachineDeployments:
    """A CRD with a scale subresource (Cluster API's MachineDeployment) and its objects."""

    def __init__(self, api: client.ApiClient, *, scale: bool = True) -> None:
        crd = machine_deployment_crd(scale=scale)
        client.ApiextensionsV1Api(api).create_custom_resource_definition(
            crd, _request_timeout=TIMEOUT
        )
        self.objects = client.CustomObjectsApi(api)
        self.where = (GROUP, VERSION, NS, PLURAL)

    def create(self, name: str, replicas: int | None) -> dict[str, Any]:
        obj: dict[str, Any] = self.objects.create_namespaced_custom_object(
            *self.where, machine_deployment(name, replicas), _request_timeout=TIMEOUT
        )
        return obj

    def __getattr__(self, verb: str) -> Any:  # get_scale -> get_..._custom_object_scale
        base, _, sub = verb.partition("_")
        suffix = f"_{sub}" if sub else ""
        method = getattr(self.objects, f"{base}_namespaced_custom_object{suffix}")
        return lambda *args: method(*self.where, *args, _request_timeout=TIMEOUT)


def test_scale_get_is_an_autoscaling_v1_scale_of_the_parent(api: client.ApiClient) -> None:
    mds = MachineDeployments(api)
    made = mds.create("gpu", 1)
    scale = mds.get_scale("gpu")
    assert (scale["apiVersion"], scale["kind"]) == ("autoscaling/v1", "Scale")
    meta = made["metadata"]
    for key in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp"):
        assert scale["metadata"][key] == meta[key]
    assert scale["spec"] == {"replicas": 1}
    assert scale["status"] == {"replicas": 0, "selector": ""}  # no status yet: 0 and ""

    mds.patch_status("gpu", {"status": {"replicas": 1, "selector": "pool=gpu"}})
    assert mds.get_scale("gpu")["status"] == {"replicas": 1, "selector": "pool=gpu"}

    mds.create("unsized", None)  # no spec.replicas: GET /scale is an error, as in etcd.go
    with pytest.raises(ApiException) as e:
        mds.get_scale("unsized")
    assert e.value.status == 500 and status_of(e)["reason"] == "InternalError"
    with pytest.raises(ApiException) as e:
        mds.get_scale("nope")
    assert e.value.status == 404 and status_of(e)["reason"] == "NotFound"


def test_scale_patch_and_replace_write_spec_replicas_to_the_parent(
    api: client.ApiClient,
) -> None:
    mds = MachineDeployments(api)
    made = mds.create("gpu", 1)
    scaled = mds.patch_scale("gpu", {"spec": {"replicas": 3}})
    assert scaled["kind"] == "Scale" and scaled["spec"]["replicas"] == 3
    parent = mds.get("gpu")
    assert parent["spec"]["replicas"] == 3 and parent["spec"]["clusterName"] == "gpu"
    assert parent["metadata"]["generation"] == 2  # a spec change
    assert parent["metadata"]["resourceVersion"] == scaled["metadata"]["resourceVersion"]
    assert int(scaled["metadata"]["resourceVersion"]) > int(made["metadata"]["resourceVersion"])
    since = made["metadata"]["resourceVersion"]
    events = watch.Watch().stream(
        mds.objects.list_namespaced_custom_object, *mds.where, resource_version=since,
        timeout_seconds=1, _request_timeout=TIMEOUT,
    )  # fmt: skip
    seen = [(e["type"], e["object"]["spec"]["replicas"]) for e in events]
    assert seen == [("MODIFIED", 3)]
    again = mds.patch_scale("gpu", {"spec": {"replicas": 3}})  # no change: no new version
    assert again["metadata"]["resourceVersion"] == scaled["metadata"]["resourceVersion"]

    # PUT a Scale: its resourceVersion is a precondition; without one the write is unconditional.
    read = mds.get_scale("gpu")
    replaced = mds.replace_scale("gpu", dict(read, spec={"replicas": 2}))
    assert replaced["spec"]["replicas"] == 2 and mds.get("gpu")["spec"]["replicas"] == 2
    with pytest.raises(ApiException) as e:
        mds.replace_scale("gpu", dict(read, spec={"replicas": 5}))  # read before the PUT above
    assert e.value.status == 409 and status_of(e)["reason"] == "Conflict"
    with pytest.raises(ApiException) as e:
        stale = {"metadata": {"resourceVersion": read["metadata"]["resourceVersion"]}}
        mds.patch_scale("gpu", stale | {"spec": {"replicas": 5}})
    assert e.value.status == 409
    body = {"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": {"name": "gpu"}}
    assert mds.replace_scale("gpu", body | {"spec": {"replicas": 4}})["spec"]["replicas"] == 4

    # A Scale carries spec.replicas only: other fields of the patch do not reach the parent.
    mds.patch_scale("gpu", {"metadata": {"labels": {"x": "y"}}, "status": {"replicas": 9}})
    parent = mds.get("gpu")
    assert "labels" not in parent["metadata"] and "status" not in parent

    mds.create("unsized", None)  # a patch may set an absent spec.replicas, never leave it out
    assert mds.patch_scale("unsized", {"spec": {"replicas": 1}})["spec"]["replicas"] == 1
    mds.create("unsized2", None)
    with pytest.raises(ApiException) as e:
        mds.patch_scale("unsized2", {"metadata": {"labels": {"x": "y"}}})
    assert e.value.status == 400 and status_of(e)["reason"] == "BadRequest"


@pytest.mark.parametrize("replicas", [-1, "two", 1.5, 2**31, True])
def test_scale_rejects_replicas_that_are_no_non_negative_int32(
    api: client.ApiClient, replicas: Any
) -> None:
    mds = MachineDeployments(api)
    mds.create("gpu", 1)
    with pytest.raises(ApiException) as e:  # a patch: decoded or validated, 422 either way
        mds.patch_scale("gpu", {"spec": {"replicas": replicas}})
    assert e.value.status == 422 and status_of(e)["reason"] == "Invalid"
    body = dict(mds.get_scale("gpu"), spec={"replicas": replicas})
    with pytest.raises(ApiException) as e:  # a PUT body that does not decode is 400
        mds.replace_scale("gpu", body)
    assert e.value.status == (422 if replicas == -1 else 400)
    kept = mds.get("gpu")
    assert kept["spec"]["replicas"] == 1 and kept["metadata"]["generation"] == 1
    with pytest.raises(ApiException) as e:  # the parent itself is validated the same way
        mds.patch("gpu", {"spec": {"replicas": replicas}})
    assert e.value.status == 422 and status_of(e)["reason"] == "Invalid"


def test_scale_of_a_resource_without_the_subresource_is_404(api: client.ApiClient) -> None:
    mds = MachineDeployments(api, scale=False)
    mds.create("gpu", 1)
    with pytest.raises(ApiException) as e:
        mds.get_scale("gpu")
    assert e.value.status == 404 and status_of(e)["reason"] == "NotFound"
    with pytest.raises(ApiException) as e:
        mds.patch_scale("gpu", {"spec": {"replicas": 2}})
    assert e.value.status == 404
    assert mds.get("gpu")["spec"]["replicas"] == 1
    mds.patch("gpu", {"spec": {"replicas": -1}})  # no scale subresource: no replicas rule
