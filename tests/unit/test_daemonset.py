"""The Kubernetes manifests in daemonset/ (a kustomize base, the CRDs, two overlays) stay valid
and in step with Fleet's own code.

No cluster needed. Every object is checked against the Kubernetes OpenAPI schemas and the
``kubernetes`` client's models (tests/unit/k8svalidate.py), and a broken copy is shown to be
rejected by both; the containers' args parse with ``fleet.cli``'s parser; probes hit routes a real
coordinator and agent serve; the RBAC rules are exactly the Kubernetes API calls coordinator/ and
agent/ make (plus ``PLANNED``); the overlays name the images the Dockerfile builds. The overlays
are rendered with ``kubectl kustomize`` (offline) when kubectl is installed; without it, only
their files are checked.
"""

from __future__ import annotations

import argparse
import copy
import functools
import re
import shutil
import socket
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import trio
import yaml

from fleet.cli import _parser

from .k8svalidate import model_error, schema_error

ROOT = Path(__file__).resolve().parents[2]
DAEMONSET = ROOT / "daemonset"
BASE = DAEMONSET / "base"
OVERLAYS = ("test-cluster", "production")
KUSTOMIZATIONS = [BASE, DAEMONSET / "crds", *(DAEMONSET / "overlays" / o for o in OVERLAYS)]
WORKLOAD_KINDS = {"Deployment", "DaemonSet", "StatefulSet", "Job"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
ENV_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")

Obj = dict[str, Any]
Rule = tuple[str, str, str]  # (api group, resource, verb)


# -- loading ---------------------------------------------------------------------------------


def _load(path: Path) -> list[Obj]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def _kustomization(folder: Path) -> Obj:
    (doc,) = _load(folder / "kustomization.yaml")
    return doc


def _objects(folder: Path = BASE) -> list[Obj]:
    """The objects a kustomization's resources hold, folders followed (no patches applied)."""
    out = []
    for resource in _kustomization(folder)["resources"]:
        path = (folder / resource).resolve()
        out += _objects(path) if path.is_dir() else _load(path)
    return out


@functools.cache
def _rendered(overlay: str) -> tuple[Obj, ...]:
    """``kubectl kustomize`` of an overlay: what ``kubectl apply -k`` would send."""
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(DAEMONSET / "overlays" / overlay)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d is not None)


def _manifests(source: str) -> list[Obj]:
    """``base``'s objects as written, or an overlay's rendered (skipped without kubectl)."""
    if source == "base":
        return _objects()
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: overlays are not rendered")
    return copy.deepcopy(list(_rendered(source)))


def _one(objects: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _of_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def _workloads(objects: list[Obj]) -> list[Obj]:
    return [o for o in objects if o["kind"] in WORKLOAD_KINDS]


def _containers(workload: Obj) -> Iterator[Obj]:
    spec = workload["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def _container(objects: list[Obj], kind: str, name: str) -> Obj:
    (container,) = _one(objects, kind, name)["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _fleet_args(container: Obj) -> argparse.Namespace:
    """Parse a container's ``fleet`` argv with Fleet's parser, ``$(VAR)`` replaced first."""
    argv = [*container.get("command", []), *container.get("args", [])]
    assert argv[:1] == ["fleet"], f"{container['name']} does not run `fleet`: {argv}"
    declared = {e["name"] for e in container.get("env", [])}
    resolved = []
    for arg in argv[1:]:
        for var in ENV_REF.findall(arg):
            # Kubernetes leaves an undeclared $(VAR) as literal text: always a bug here.
            assert var in declared, f"{container['name']}: $({var}) is not in env"
        resolved.append(ENV_REF.sub(lambda m: f"placeholder-{m[1].lower()}", arg))
    try:
        return _parser().parse_args(resolved)
    except SystemExit as exc:  # argparse reports on stderr and exits
        pytest.fail(f"{container['name']}: `fleet {' '.join(resolved)}` does not parse ({exc})")


def _field_ref(container: Obj, var: str) -> str:
    (env,) = [e for e in container["env"] if e["name"] == var]
    return str(env["valueFrom"]["fieldRef"]["fieldPath"])


def _port_number(container: Obj, port: int | str) -> int:
    """The containerPort a probe or Service port refers to (by name or number)."""
    ports = container.get("ports", [])
    if isinstance(port, str):
        named = [p["containerPort"] for p in ports if p.get("name") == port]
        assert named, f"{container['name']} declares no port named {port!r}"
        return int(named[0])
    assert port in {p["containerPort"] for p in ports}, f"{container['name']}: no port {port}"
    return port


def _endpoint_port(endpoint: str) -> int:
    port = urlsplit(endpoint).port
    assert port is not None, f"{endpoint} names no port"
    return port


def _selects(service_or_pdb: Obj, workload: Obj) -> bool:
    selector = service_or_pdb["spec"]["selector"]
    selector = selector.get("matchLabels", selector)
    return bool(selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items())


# -- the files -------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(DAEMONSET)))
def test_every_file_is_used_and_every_named_file_exists(folder: Path) -> None:
    k = _kustomization(folder)
    resources = k.get("resources", [])
    assert len(resources) == len(set(resources)), "a resource is listed twice"
    named = set()
    for entry in resources:
        path = (folder / entry).resolve()
        assert path.exists(), f"{folder.name} lists {entry}, which is missing"
        named.add(path)
    for patch in k.get("patches", []):
        if "path" in patch:
            assert (folder / patch["path"]).is_file(), patch["path"]
            named.add((folder / patch["path"]).resolve())
    on_disk = {p.resolve() for p in folder.glob("*.y*ml") if p.name != "kustomization.yaml"}
    assert on_disk - named == set(), "YAML files the kustomization does not use"


def test_the_base_sets_namespace_label_and_overridable_image() -> None:
    k = _kustomization(BASE)
    assert k["namespace"] == "fleet-system"
    (labels,) = k["labels"]
    assert labels["pairs"] == {"app.kubernetes.io/part-of": "fleet"} and labels["includeSelectors"]
    assert "fleet" in {i["name"] for i in k["images"]}
    objects = _objects()
    # The `images` entry only rewrites containers that use exactly that name.
    for workload in _workloads(objects):
        for container in _containers(workload):
            assert container["image"] == "fleet", container["name"]
    assert _one(objects, "Namespace", "fleet-system")
    assert _of_kind(objects, "CustomResourceDefinition"), "the base installs the CRDs"


def test_every_object_has_api_version_kind_and_name_unique_per_kind() -> None:
    objects = _objects()
    for obj in objects:
        assert obj.get("apiVersion") and obj.get("kind"), obj
        assert obj.get("metadata", {}).get("name"), obj
        # The kustomization sets the namespace; one written here would fight it.
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace") in (None, "fleet-system"), obj["metadata"]
    keys = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys))


# -- against the Kubernetes API's schemas and the client's models ----------------------------


@pytest.mark.parametrize("source", ["base", *OVERLAYS])
def test_every_object_is_valid_for_the_api_and_the_client(source: str) -> None:
    objects = _manifests(source)
    assert {o["kind"] for o in objects} >= {"CustomResourceDefinition", "Deployment", "DaemonSet",
                                             "Service", "Role", "PodDisruptionBudget"}  # fmt: skip
    for obj in objects:
        where = f"{source}: {obj['kind']}/{obj['metadata']['name']}"
        assert schema_error(obj) is None, f"{where}: {schema_error(obj)}"
        assert model_error(obj) is None, f"{where}: {model_error(obj)}"


def _broken(kind: str, name: str, path: str, value: Any) -> Obj:
    """A copy of a base object with ``value`` set at ``path`` (dots; ``[n]`` for list items)."""
    obj = copy.deepcopy(_one(_objects(), kind, name))
    *parents, last = re.findall(r"[^.\[\]]+", path)
    node: Any = obj
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    node[int(last) if last.isdigit() else last] = value
    return obj


BROKEN = {
    "a typo field": ("Deployment", "fleet-coordinator",
                     "spec.template.spec.containers[0].imagePullPolcy", "Always"),
    "a string count": ("Deployment", "fleet-coordinator", "spec.replicas", "two"),
    "a number as a string": ("DaemonSet", "fleet-agent",
                             "spec.template.spec.containers[0].ports[0].containerPort", "8081"),
    "a list as a map": ("Deployment", "fleet-coordinator", "spec.template.spec.containers[0].args",
                        {"coordinator": True}),
    "a typo at the top": ("Service", "fleet-coordinator-agents", "spec.clusterIp", "None"),
    "a PDB typo": ("PodDisruptionBudget", "fleet-coordinator", "spec.minAvailible", 1),
    "a CRD typo": ("CustomResourceDefinition", "fleetmodels.fleet.dev",
                   "spec.versions[0].servd", True),
    "a CRD schema typo": ("CustomResourceDefinition", "fleetmodels.fleet.dev",
                          "spec.versions[0].schema.openAPIV3Schema.properties.spec.tpye", "object"),
    "a CRD scope number": ("CustomResourceDefinition", "fleetmodels.fleet.dev", "spec.scope", 3),
    "a Role rule typo": ("Role", "fleet-coordinator", "rules[0].verb", ["get"]),
}  # fmt: skip


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_copy_is_rejected_by_both(case: str) -> None:
    broken = _broken(*BROKEN[case])
    assert schema_error(broken) is not None, "the schemas accept it"
    assert model_error(broken) is not None, "the client's models take it unchanged"


def test_the_crd_is_an_apiextensions_v1_crd_checked_offline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("validation tried the network")

    for name in ("getaddrinfo", "create_connection"):
        monkeypatch.setattr(socket, name, no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    (crd,) = _of_kind(_objects(), "CustomResourceDefinition")
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert schema_error(crd) is None and model_error(crd) is None


# -- the coordinator -------------------------------------------------------------------------


def test_the_coordinator_args_parse_and_elect_through_a_lease() -> None:
    objects = _objects()
    container = _container(objects, "Deployment", "fleet-coordinator")
    args = _fleet_args(container)
    assert args.command == "coordinator"
    assert args.host == "0.0.0.0"
    assert args.port == _port_number(container, "http")
    assert _endpoint_port(args.agent_endpoint) == _port_number(container, "agent-link")
    assert urlsplit(args.agent_endpoint).hostname == "0.0.0.0"
    assert args.model is None, "the base names no model: each overlay does"
    # Several coordinators: a Lease in the pod's namespace, each named after its pod.
    assert args.leader_lease == "placeholder-pod_namespace/fleet-coordinator-leader"
    assert args.coordinator_id == "placeholder-pod_name"
    assert _field_ref(container, "POD_NAMESPACE") == "metadata.namespace"
    assert _field_ref(container, "POD_NAME") == "metadata.name"
    assert args.leader_lock is None and args.kube_api is None  # in-cluster configuration
    assert args.hot_restart  # a crashed coordinator comes back without refusing connections
    grace = _one(objects, "Deployment", "fleet-coordinator")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ]
    assert args.drain_timeout + 2 <= grace  # drained before the kubelet's SIGKILL
    # Remote sources' tokenizer files go on a writable emptyDir (the root fs is read-only).
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(args.tokenizer_cache)]
    assert not mount.get("readOnly", False)
    volumes = _one(objects, "Deployment", "fleet-coordinator")["spec"]["template"]["spec"][
        "volumes"
    ]
    assert "emptyDir" in {v["name"]: v for v in volumes}[mount["name"]]


def test_two_coordinators_roll_one_at_a_time_and_a_budget_keeps_one() -> None:
    objects = _objects()
    deployment = _one(objects, "Deployment", "fleet-coordinator")
    assert deployment["spec"]["replicas"] == 2
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    (pdb,) = _of_kind(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1 and _selects(pdb, deployment)
    assert [w["metadata"]["name"] for w in _workloads(objects) if _selects(pdb, w)] == [
        "fleet-coordinator"
    ]


def test_agents_find_every_coordinator_through_a_headless_service() -> None:
    objects = _objects()
    agent = _fleet_args(_container(objects, "DaemonSet", "fleet-agent"))
    assert agent.coordinator is None
    host, port = agent.coordinator_service.rsplit(":", 1)
    service = _one(objects, "Service", host)
    assert service["spec"]["clusterIP"] == "None"  # one DNS record per coordinator pod
    # Coordinators get ready only once agents linked to them: unready pods must be in DNS.
    assert service["spec"]["publishNotReadyAddresses"] is True
    deployment = _one(objects, "Deployment", "fleet-coordinator")
    assert _selects(service, deployment)
    (link,) = service["spec"]["ports"]
    coordinator = _container(objects, "Deployment", "fleet-coordinator")
    # Headless: agents connect to pod IPs, so the port they dial is the container's.
    assert int(port) == link["port"] == _port_number(coordinator, link["targetPort"])
    assert int(port) == _endpoint_port(_fleet_args(coordinator).agent_endpoint)


def test_clients_reach_ready_coordinators_through_the_http_service() -> None:
    objects = _objects()
    service = _one(objects, "Service", "fleet-coordinator")
    assert service["spec"].get("clusterIP") != "None"
    assert not service["spec"].get("publishNotReadyAddresses", False)
    assert [p["name"] for p in service["spec"]["ports"]] == ["http"]


def test_probes_and_service_ports_point_at_declared_ports() -> None:
    objects = _objects()
    probes = 0
    for workload in _workloads(objects):
        for container in _containers(workload):
            for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
                if (probe := container.get(kind)) is not None:
                    _port_number(container, probe["httpGet"]["port"])
                    probes += 1
    assert probes == 3
    for service in _of_kind(objects, "Service"):
        pods = [w for w in _workloads(objects) if _selects(service, w)]
        assert pods, f"Service {service['metadata']['name']} selects no workload"
        for workload in pods:
            for port in service["spec"]["ports"]:
                for container in _containers(workload):
                    _port_number(container, port.get("targetPort", port["port"]))


def test_workload_selectors_volumes_and_configmaps_resolve() -> None:
    objects = _objects()
    configmaps = {o["metadata"]["name"] for o in _of_kind(objects, "ConfigMap")}
    for workload in _workloads(objects):
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
        for container in _containers(workload):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{container['name']}: {mount['name']}"
        for volume in volumes.values():
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps


async def test_the_probed_paths_are_served(tmp_path: Path) -> None:
    """The probes' paths on a real coordinator and agent: 200 on both, the coordinator's
    readiness too while its model has no engine yet (a model without engines must not take the
    coordinator out of the Service; /readyz, which says 503 then, is not its probe)."""
    from fleet.agent.service import Agent, AgentConfig
    from fleet.coordinator.deployment import Deployment
    from fleet.coordinator.service import Coordinator, CoordinatorConfig

    objects = _objects()
    coordinator = _container(objects, "Deployment", "fleet-coordinator")
    agent_container = _container(objects, "DaemonSet", "fleet-agent")
    deployment = Deployment(model="m", model_path="/nowhere", replicas=1)
    coord = Coordinator(
        CoordinatorConfig(port=0, agent_endpoint="tcp://127.0.0.1:*", deployments=(deployment,))
    )
    agent = Agent(
        AgentConfig(coordinator_endpoint="tcp://127.0.0.1:9", http_port=0, log_dir=tmp_path),
        nvml_module=None,
    )
    async with trio.open_nursery() as nursery, httpx.AsyncClient() as http:
        addrs = await nursery.start(coord.run)
        agent_url = await nursery.start(agent.run)
        for base, container in ((addrs.http_url, coordinator), (agent_url, agent_container)):
            live = await http.get(base + container["livenessProbe"]["httpGet"]["path"])
            assert live.status_code == 200, container["name"]
        ready = await http.get(addrs.http_url + coordinator["readinessProbe"]["httpGet"]["path"])
        assert ready.status_code == 200
        assert (await http.get(addrs.http_url + "/readyz")).status_code == 503
        nursery.cancel_scope.cancel()


# -- the agent link's keys -------------------------------------------------------------------


def test_the_agent_link_is_curve_protected_with_keys_from_secrets(tmp_path: Path) -> None:
    """Both containers pass ``--curve-keys`` a read-only, non-optional mount of their own
    Secret (an agent pod never holds the coordinator's secret key); no Secret is committed; the
    README's ``kubectl create secret`` steps give each side what ``fleet keys generate`` wrote
    for it, which loads as that side's keys."""
    from fleet.protocol.curve import generate_keys, load_client_keys, load_server_keys

    objects = _objects()
    assert not _of_kind(objects, "Secret"), "keys are never committed"
    secrets = {}
    for kind, name in (("Deployment", "fleet-coordinator"), ("DaemonSet", "fleet-agent")):
        container = _container(objects, kind, name)
        path = _fleet_args(container).curve_keys
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == path]
        assert mount.get("readOnly") is True, name
        spec = _one(objects, kind, name)["spec"]["template"]["spec"]
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"].get("optional", False) is False, name
        assert volume["secret"]["defaultMode"] & 0o007 == 0, f"{name}: keys world-readable"
        secrets[name] = volume["secret"]["secretName"]
    assert secrets == {
        "fleet-coordinator": "fleet-coordinator-curve",
        "fleet-agent": "fleet-agent-curve",
    }
    readme = (DAEMONSET / "README.md").read_text()
    keys = generate_keys(tmp_path / "keys")
    for secret, folder in ((secrets["fleet-coordinator"], keys.coordinator),
                           (secrets["fleet-agent"], keys.agent)):  # fmt: skip
        step = f"create secret generic {secret} --from-file=keys/{folder.name}"
        assert readme.count(step) >= 2, f"README: no `{step}` for both overlays"
    server, client = load_server_keys(keys.coordinator), load_client_keys(keys.agent)
    assert client.server == server.public
    assert not list(keys.agent.glob("coordinator.key_secret"))


# -- the agent -------------------------------------------------------------------------------


def test_the_agent_args_parse_with_the_fleet_cli() -> None:
    objects = _objects()
    container = _container(objects, "DaemonSet", "fleet-agent")
    args = _fleet_args(container)
    assert args.command == "agent"
    assert args.http_host == "0.0.0.0"
    assert args.http_port == _port_number(container, "http")
    assert args.node_id == "placeholder-node_name"
    assert args.engine_host == "placeholder-pod_ip"
    assert _field_ref(container, "NODE_NAME") == "spec.nodeName"
    assert _field_ref(container, "POD_IP") == "status.podIP"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(args.log_dir) in mounts, "the agent's --log-dir is not a mounted volume"


def test_the_base_agent_is_neutral_and_owns_its_engines() -> None:
    """GPU runtime, node selection and sizes are the overlays'; the base agent gets engine
    grace, a memory-backed /dev/shm and the node's model folder."""
    spec = _one(_objects(), "DaemonSet", "fleet-agent")["spec"]["template"]["spec"]
    assert "runtimeClassName" not in spec and "nodeSelector" not in spec
    assert spec.get("hostNetwork", False) is False
    assert spec["terminationGracePeriodSeconds"] >= 60
    (container,) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert mounts["/models"]["hostPath"]["path"] == "/var/lib/fleet/models"
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"


def test_the_coordinator_reads_the_mounted_scheduler_config(tmp_path: Path) -> None:
    """The file ``--scheduler-config`` names is a key of the ConfigMap mounted there, and it
    loads with Fleet's own loader (a config Fleet rejects would stop the coordinator)."""
    from fleet.coordinator.router.config import load_config_file

    objects = _objects()
    container = _container(objects, "Deployment", "fleet-coordinator")
    path = Path(_fleet_args(container).scheduler_config)
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    spec = _one(objects, "Deployment", "fleet-coordinator")["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    data = _one(objects, "ConfigMap", volume["configMap"]["name"])["data"]
    assert path.name in data
    (tmp_path / path.name).write_text(data[path.name])
    assert load_config_file(tmp_path / path.name) is not None
    config = yaml.safe_load(data[path.name])
    assert (config["apiVersion"], config["kind"]) == ("llm-d.ai/v1alpha1", "EndpointPickerConfig")


def test_both_run_as_non_root_without_privileges() -> None:
    for workload in _workloads(_objects()):
        spec = workload["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in _containers(workload):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


# -- RBAC: exactly the API calls the code makes ----------------------------------------------

# The kubernetes client's method names Fleet calls (or passes to ``watch.Watch().stream``),
# and the resource each names; the verb is the method's prefix (VERBS). Custom-object methods
# name no resource: the code calls them for FleetModels, and the ``_scale`` ones for the node
# scale-out target (a Cluster API MachineDeployment).
API_METHODS: tuple[tuple[str, str, str], ...] = (
    (r"_namespaced_lease", "coordination.k8s.io", "leases"),
    (r"_namespaced_custom_object", "fleet.dev", "fleetmodels"),
    (r"_namespaced_custom_object_status", "fleet.dev", "fleetmodels/status"),
    (r"_namespaced_custom_object_scale", "cluster.x-k8s.io", "machinedeployments/scale"),
    (r"_namespaced_event", "", "events"),
)
VERBS = {"read": "get", "get": "get", "list": "list", "create": "create",
         "replace": "update", "patch": "patch", "delete": "delete"}  # fmt: skip
CALL = re.compile(rf"\.((?:{'|'.join(VERBS)})_\w+)\b")
WATCH = re.compile(  # a list method passed to Watch().stream, or called with watch=True
    r"\.stream\(\s*[\w.]*\.(list_\w+)"
    r"|\b(list_\w+)\((?:[^()]|\([^()]*\))*\bwatch\s*=\s*True"
)
API_LIKE = re.compile(r"_namespaced_|_cluster_|_for_all_namespaces")

# Rules for calls being written now, not yet in the code: each with the module that will make
# them. The lead empties this when merging those modules (a test fails once the code makes a
# call listed here, so it cannot go stale).
PLANNED: dict[Rule, str] = {}


def api_calls(source: str) -> set[Rule]:
    """The (group, resource, verb) of every kubernetes-client call in ``source``.

    Raises:
        AssertionError: a call that looks like the Kubernetes API but is not in API_METHODS.
    """
    used: set[Rule] = set()
    events_group = "events.k8s.io" if "EventsV1Api" in source else ""
    watched = {a or b for a, b in WATCH.findall(source)}
    for method in {*CALL.findall(source), *watched}:
        prefix, rest = method.split("_", 1)
        matches = [(g, r) for pattern, g, r in API_METHODS if re.fullmatch(pattern, f"_{rest}")]
        if not matches:
            assert not API_LIKE.search(method), f"{method}: add it to API_METHODS"
            continue
        ((group, resource),) = matches
        group = events_group if resource == "events" else group
        used.add((group, resource, VERBS[prefix]))
        if method in watched:
            used.add((group, resource, "watch"))
    return used


def _code_calls(package: str) -> set[Rule]:
    return {rule for path in sorted((ROOT / package).rglob("*.py"))
            for rule in api_calls(path.read_text())}  # fmt: skip


def _granted(objects: list[Obj], account: str) -> set[Rule]:
    rules: set[Rule] = set()
    for binding in _of_kind(objects, "RoleBinding") + _of_kind(objects, "ClusterRoleBinding"):
        if any(s["name"] == account for s in binding["subjects"]):
            ref = binding["roleRef"]
            for rule in _one(objects, ref["kind"], ref["name"])["rules"]:
                rules |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"]
                          for v in rule["verbs"]}  # fmt: skip
    return rules


def test_the_scanner_finds_every_kind_of_call() -> None:
    source = """
        api.read_namespaced_lease(name, ns); api.replace_namespaced_lease(name, ns, body)
        for e in watch.Watch().stream(self.custom.list_namespaced_custom_object, GROUP): ...
        custom.patch_namespaced_custom_object_status(GROUP, V, ns, PLURAL, name, body)
        custom.patch_namespaced_custom_object_scale(...); core.create_namespaced_event(ns, ev)
        custom.list_namespaced_custom_object(GROUP, V, ns, PLURAL,
                                             watch=True, timeout_seconds=f(30))
        items.patch_thing(); self.list_engines(); model.get_config()
    """
    assert api_calls(source) == {
        ("coordination.k8s.io", "leases", "get"),
        ("coordination.k8s.io", "leases", "update"),
        ("fleet.dev", "fleetmodels", "list"),
        ("fleet.dev", "fleetmodels", "watch"),
        ("fleet.dev", "fleetmodels/status", "patch"),
        ("cluster.x-k8s.io", "machinedeployments/scale", "patch"),
        ("", "events", "create"),
    }
    assert api_calls("events.EventsV1Api(c).create_namespaced_event(ns, e)") == {
        ("events.k8s.io", "events", "create")
    }
    with pytest.raises(AssertionError, match="API_METHODS"):
        api_calls("apps.patch_namespaced_deployment_scale(name, ns, body)")


def test_the_coordinators_roles_grant_exactly_the_calls_it_makes() -> None:
    objects = _objects()
    used = _code_calls("coordinator")
    assert {("coordination.k8s.io", "leases", v) for v in ("get", "create", "update")} <= used
    granted = _granted(objects, "fleet-coordinator")
    assert used - granted == set(), "calls with no RBAC rule"
    assert granted - used - PLANNED.keys() == set(), "rules no code uses (nor PLANNED)"
    assert PLANNED.keys() <= granted, "PLANNED calls with no rule"
    now_used = {rule: module for rule, module in PLANNED.items() if rule in used}
    assert not now_used, f"the code makes these calls now: drop them from PLANNED: {now_used}"


def test_the_agent_gets_no_api_access() -> None:
    objects = _objects()
    assert _code_calls("agent") == set()
    assert not any("kubernetes" in p.read_text() for p in (ROOT / "agent").rglob("*.py"))
    assert _granted(objects, "fleet-agent") == set()
    account = _one(objects, "ServiceAccount", "fleet-agent")
    assert account["automountServiceAccountToken"] is False
    spec = _one(objects, "DaemonSet", "fleet-agent")["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "fleet-agent"
    assert spec["automountServiceAccountToken"] is False


def test_rbac_is_namespaced_without_wildcards_and_bindings_resolve() -> None:
    objects = _objects()
    assert not _of_kind(objects, "ClusterRole") and not _of_kind(objects, "ClusterRoleBinding")
    accounts = {o["metadata"]["name"] for o in _of_kind(objects, "ServiceAccount")}
    for workload in _workloads(objects):
        assert workload["spec"]["template"]["spec"]["serviceAccountName"] in accounts
    for binding in _of_kind(objects, "RoleBinding"):
        assert _one(objects, binding["roleRef"]["kind"], binding["roleRef"]["name"])
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount" and subject["name"] in accounts
    for role in _of_kind(objects, "Role"):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]


def test_the_lease_rule_names_the_lease_the_coordinators_elect_through() -> None:
    objects = _objects()
    lease = _fleet_args(_container(objects, "Deployment", "fleet-coordinator")).leader_lease
    name = lease.split("/", 1)[1]
    leases = [r for r in _one(objects, "Role", "fleet-coordinator")["rules"]
              if r["resources"] == ["leases"]]  # fmt: skip
    by_verb = {v: r.get("resourceNames") for r in leases for v in r["verbs"]}
    assert by_verb == {"create": None, "get": [name], "update": [name]}


# -- the overlays ----------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_an_overlay_renders_every_base_object_labelled_and_namespaced(overlay: str) -> None:
    rendered = _manifests(overlay)
    keys = sorted((o["kind"], o["metadata"]["name"]) for o in rendered)
    assert keys == sorted((o["kind"], o["metadata"]["name"]) for o in _objects())
    for obj in rendered:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "fleet"
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"]["namespace"] == "fleet-system", obj["metadata"]["name"]
    coordinator = _fleet_args(_container(rendered, "Deployment", "fleet-coordinator"))
    agent = _fleet_args(_container(rendered, "DaemonSet", "fleet-agent"))
    assert coordinator.model and coordinator.model_name and coordinator.replicas >= 1
    assert agent.coordinator_service == "fleet-coordinator-agents:5555"
    assert _one(rendered, "Deployment", "fleet-coordinator")["spec"]["replicas"] == 2


@needs_kubectl
def test_the_test_cluster_runs_simulators_on_fake_gpus_on_any_node() -> None:
    rendered = _manifests("test-cluster")
    coordinator = _fleet_args(_container(rendered, "Deployment", "fleet-coordinator"))
    assert coordinator.engine == "sim"
    assert coordinator.model == "/opt/fleet/models/demo"  # in the CPU image (Dockerfile)
    assert "/opt/fleet/models/demo" in (ROOT / "Dockerfile").read_text()
    agent_container = _container(rendered, "DaemonSet", "fleet-agent")
    assert _fleet_args(agent_container).fake_gpus
    spec = _one(rendered, "DaemonSet", "fleet-agent")["spec"]["template"]["spec"]
    assert "runtimeClassName" not in spec and "nodeSelector" not in spec
    for workload in _workloads(rendered):
        for container in _containers(workload):
            assert container["resources"]["limits"]["memory"].endswith(("Mi", "Gi"))


@needs_kubectl
def test_production_agents_see_every_gpu_of_gpu_nodes_only() -> None:
    rendered = _manifests("production")
    spec = _one(rendered, "DaemonSet", "fleet-agent")["spec"]["template"]["spec"]
    assert spec["runtimeClassName"] == "nvidia"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    (container,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert {"NODE_NAME", "POD_IP", "HOME"} <= env.keys()  # the base's env is kept
    for section in ("requests", "limits"):
        assert "nvidia.com/gpu" not in container.get("resources", {}).get(section, {})
    coordinator = _fleet_args(_container(rendered, "Deployment", "fleet-coordinator"))
    assert coordinator.engine == "vllm"
    # --model is the path the agents see: under their model mount.
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    assert any(Path(coordinator.model).is_relative_to(m) for m in mounts)


def test_overlay_patches_target_base_objects() -> None:
    """Without kubectl: each patch names (or, as a strategic merge, is) a base object."""
    keys = {(o["kind"], o["metadata"]["name"]) for o in _objects()}
    for overlay in OVERLAYS:
        folder = DAEMONSET / "overlays" / overlay
        assert _kustomization(folder)["resources"] == ["../../base"]
        for patch in _kustomization(folder)["patches"]:
            if "target" in patch:
                assert (patch["target"]["kind"], patch["target"]["name"]) in keys, patch
                assert isinstance(_load(folder / patch["path"])[0], list)  # JSON 6902 ops
            else:
                for doc in _load(folder / patch["path"]):
                    assert (doc["kind"], doc["metadata"]["name"]) in keys, patch


# -- the image -------------------------------------------------------------------------------


def _documented_images() -> dict[str, str]:
    """``docker build`` target -> tag, from the Dockerfile's header."""
    text = (ROOT / "Dockerfile").read_text()
    builds = re.findall(r"^#\s+docker build (?:--target (\w+) )?-t (\S+) \.", text, re.M)
    return {target or "gpu": tag for target, tag in builds}


def test_the_overlays_run_the_images_the_dockerfile_builds() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    images = _documented_images()
    assert images == {"gpu": f"fleet:{version}", "cpu": f"fleet:{version}-cpu"}
    named = {}
    for overlay in OVERLAYS:
        (image,) = _kustomization(DAEMONSET / "overlays" / overlay)["images"]
        named[overlay] = f"{image['newName']}:{image['newTag']}"
        if KUBECTL is not None:
            for workload in _workloads(_manifests(overlay)):
                for container in _containers(workload):
                    assert container["image"] == named[overlay]
    assert named == {"production": images["gpu"], "test-cluster": images["cpu"]}
    readme = (DAEMONSET / "README.md").read_text()
    for target, tag in images.items():
        command = f"docker build {'--target cpu ' if target == 'cpu' else ''}-t {tag} ."
        assert command in readme, f"daemonset/README.md does not say `{command}`"


def test_the_dockerfile_builds_both_variants_running_fleet() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+) AS (\w+)$", text, re.M)
    assert stages == [("python:3.11-slim-bookworm", "cpu"), ("${VLLM_IMAGE}", "gpu")]
    # gpu last: the default target, what a plain `docker build .` makes.
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (vllm,) = extras["optional-dependencies"]["gpu"]
    assert f"ARG VLLM_IMAGE=vllm/vllm-openai:v{vllm.split('==')[1]}" in text
    assert text.count('ENTRYPOINT ["fleet"]') == 2
    assert '"/src/fleet[cpu,tracing]"' in text  # the CPU engine, and --otel-endpoint
