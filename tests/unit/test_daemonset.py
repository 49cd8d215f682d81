"""The kustomize base in daemonset/ stays well-formed and in step with Fleet's own CLI.

Static checks over the YAML files (no cluster needed): every file is listed in the kustomization
and every listed file exists; every object is named; the coordinator's and agent's container args
parse with ``fleet.cli``'s parser, so a renamed flag breaks this test rather than a rollout; probes
and Service target ports name ports the containers declare; the agent reaches the coordinator
through the Service. If ``kubectl`` is on PATH, the base is also rendered with ``kubectl kustomize``
(offline); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from fleet.cli import _parser

BASE = Path(__file__).resolve().parents[2] / "daemonset"
KUSTOMIZATION = BASE / "kustomization.yaml"
WORKLOAD_KINDS = {"Deployment", "DaemonSet", "StatefulSet", "Job"}
ENV_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")

Obj = dict[str, Any]


def _yaml_files() -> list[Path]:
    return sorted(p for p in BASE.rglob("*") if p.suffix in {".yaml", ".yml"})


def _load(path: Path) -> list[Obj]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def _kustomization() -> Obj:
    (doc,) = _load(KUSTOMIZATION)
    return doc


def _objects() -> list[Obj]:
    return [obj for path in _yaml_files() if path != KUSTOMIZATION for obj in _load(path)]


def _of_kind(kind: str) -> list[Obj]:
    return [o for o in _objects() if o["kind"] == kind]


def _one(kind: str, name: str) -> Obj:
    found = [o for o in _of_kind(kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _workloads() -> list[Obj]:
    return [o for o in _objects() if o["kind"] in WORKLOAD_KINDS]


def _containers(workload: Obj) -> Iterator[Obj]:
    spec = workload["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def _container(kind: str, name: str) -> Obj:
    (container,) = _one(kind, name)["spec"]["template"]["spec"]["containers"]
    return container


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


def _port_number(container: Obj, port: int | str) -> int:
    """The containerPort a probe or Service port refers to (by name or number)."""
    ports = container.get("ports", [])
    if isinstance(port, str):
        named = [p["containerPort"] for p in ports if p.get("name") == port]
        assert named, f"{container['name']} declares no port named {port!r}"
        return int(named[0])
    assert port in {p["containerPort"] for p in ports}, (
        f"{container['name']} does not declare port {port}"
    )
    return port


def _endpoint_port(endpoint: str) -> int:
    port = urlsplit(endpoint).port
    assert port is not None, f"{endpoint} names no port"
    return port


# -- the files -------------------------------------------------------------------------------


def test_every_yaml_file_is_listed_and_every_listed_file_exists() -> None:
    resources = _kustomization()["resources"]
    assert len(resources) == len(set(resources)), "a resource is listed twice"
    for resource in resources:
        assert (BASE / resource).is_file(), f"kustomization lists {resource}, which is missing"
    listed = {(BASE / r).resolve() for r in resources}
    on_disk = {p.resolve() for p in _yaml_files() if p != KUSTOMIZATION}
    assert on_disk - listed == set(), "YAML files the kustomization does not list"


def test_kustomization_sets_namespace_label_and_overridable_image() -> None:
    k = _kustomization()
    assert k["namespace"] == "fleet-system"
    assert k["commonLabels"]["app.kubernetes.io/part-of"] == "fleet"
    assert "fleet" in {i["name"] for i in k["images"]}
    # The `images` entry only rewrites containers that use exactly that name.
    for workload in _workloads():
        for container in _containers(workload):
            assert container["image"] == "fleet", container["name"]
    assert _one("Namespace", "fleet-system")


def test_every_object_has_api_version_kind_and_name() -> None:
    objects = _objects()
    assert objects
    for obj in objects:
        assert obj.get("apiVersion"), obj
        assert obj.get("kind"), obj
        assert obj.get("metadata", {}).get("name"), obj
        # The kustomization sets the namespace; one written here would fight it.
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") in (None, "fleet-system"), obj["metadata"]


def test_names_are_unique_per_kind() -> None:
    keys = [(o["kind"], o["metadata"]["name"]) for o in _objects()]
    assert len(keys) == len(set(keys))


# -- args against the CLI --------------------------------------------------------------------


def test_coordinator_args_parse_with_the_fleet_cli() -> None:
    container = _container("Deployment", "fleet-coordinator")
    args = _fleet_args(container)
    assert args.command == "coordinator"
    assert args.host == "0.0.0.0"
    assert args.port == _port_number(container, "http")
    assert _endpoint_port(args.agent_endpoint) == _port_number(container, "agent-link")
    assert urlsplit(args.agent_endpoint).hostname == "0.0.0.0"
    assert args.model.startswith("/models/")
    assert args.replicas >= 1
    assert args.gpus_per_engine >= 1
    assert args.hot_restart  # a crashed coordinator comes back without refusing connections
    grace = _one("Deployment", "fleet-coordinator")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ]
    assert args.drain_timeout + 2 <= grace  # drained before the kubelet's SIGKILL


def test_agent_args_parse_with_the_fleet_cli() -> None:
    container = _container("DaemonSet", "fleet-agent")
    args = _fleet_args(container)
    assert args.command == "agent"
    assert args.http_host == "0.0.0.0"
    assert args.http_port == _port_number(container, "http")
    assert args.node_id == "placeholder-node_name"
    assert args.engine_host == "placeholder-pod_ip"
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(args.log_dir) in mounts, "the agent's --log-dir is not a mounted volume"


def test_agent_reaches_the_coordinator_through_its_service() -> None:
    agent = _fleet_args(_container("DaemonSet", "fleet-agent"))
    coordinator = _container("Deployment", "fleet-coordinator")
    coord_args = _fleet_args(coordinator)
    target = urlsplit(agent.coordinator)
    assert target.scheme == "tcp"
    service = _one("Service", str(target.hostname))
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == target.port]
    assert _port_number(coordinator, port["targetPort"]) == _endpoint_port(
        coord_args.agent_endpoint
    )
    # Readiness waits for agents, and agents come through this Service (see the manifest).
    assert service["spec"].get("publishNotReadyAddresses") is True


def test_model_path_is_under_the_agents_model_mount() -> None:
    model = Path(_fleet_args(_container("Deployment", "fleet-coordinator")).model)
    mounts = {m["mountPath"] for m in _container("DaemonSet", "fleet-agent")["volumeMounts"]}
    assert any(model.is_relative_to(m) for m in mounts)


# -- ports, probes, volumes ------------------------------------------------------------------


def test_probes_point_at_declared_ports() -> None:
    probes = 0
    for workload in _workloads():
        for container in _containers(workload):
            for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
                probe = container.get(kind)
                if probe is None:
                    continue
                action = probe.get("httpGet") or probe.get("tcpSocket")
                assert action is not None, f"{container['name']} {kind}: no port-based action"
                _port_number(container, action["port"])
                probes += 1
    assert probes >= 3


def test_probe_paths() -> None:
    coordinator = _container("Deployment", "fleet-coordinator")
    assert coordinator["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert coordinator["readinessProbe"]["httpGet"]["path"] == "/readyz"
    agent = _container("DaemonSet", "fleet-agent")
    assert agent["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert _port_number(agent, agent["livenessProbe"]["httpGet"]["port"]) == 8081


def test_service_target_ports_match_container_ports() -> None:
    services = _of_kind("Service")
    assert services
    for service in services:
        selector = service["spec"]["selector"]
        pods = [
            w
            for w in _workloads()
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert pods, f"Service {service['metadata']['name']} selects no workload"
        for workload in pods:
            containers = list(_containers(workload))
            for port in service["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                protocol = port.get("protocol", "TCP")
                matches = [
                    p
                    for c in containers
                    for p in c.get("ports", [])
                    if target in (p.get("name"), p["containerPort"])
                    and p.get("protocol", "TCP") == protocol
                ]
                assert matches, f"{service['metadata']['name']}: no container port {target}"


def test_workload_selectors_match_their_templates() -> None:
    for workload in _workloads():
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), workload["metadata"]["name"]


def test_volume_mounts_name_declared_volumes_and_configmaps_exist() -> None:
    configmaps = {o["metadata"]["name"] for o in _of_kind("ConfigMap")}
    for workload in _workloads():
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
        for container in _containers(workload):
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{container['name']}: {mount['name']}"
        for volume in volumes.values():
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps


def test_coordinator_mounts_the_scheduler_config_and_runs_as_non_root() -> None:
    deployment = _one("Deployment", "fleet-coordinator")
    spec = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 1
    assert spec["securityContext"]["runAsNonRoot"] is True
    (container,) = spec["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"requests", "limits"} <= container["resources"].keys()
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/etc/fleet"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == "fleet-scheduler-config"


def test_agent_daemonset_runs_on_gpu_nodes_and_owns_its_engines() -> None:
    spec = _one("DaemonSet", "fleet-agent")["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(
        t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"]
    )
    assert spec.get("hostNetwork", False) is False
    assert spec["terminationGracePeriodSeconds"] >= 60
    # GPUs come from the nvidia runtime with NVIDIA_VISIBLE_DEVICES=all, not the device plugin.
    assert spec["runtimeClassName"] == "nvidia"
    (container,) = spec["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    for section in ("requests", "limits"):
        assert "nvidia.com/gpu" not in container.get("resources", {}).get(section, {})
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert mounts["/models"]["hostPath"]["path"] == "/var/lib/fleet/models"
    assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory"


# -- RBAC and the scheduler config -----------------------------------------------------------


def test_service_accounts_and_bindings_resolve() -> None:
    accounts = {o["metadata"]["name"] for o in _of_kind("ServiceAccount")}
    for workload in _workloads():
        assert workload["spec"]["template"]["spec"]["serviceAccountName"] in accounts
    for binding in _of_kind("RoleBinding") + _of_kind("ClusterRoleBinding"):
        ref = binding["roleRef"]
        assert _one(ref["kind"], ref["name"])
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount" and subject["name"] in accounts


def _rules(kind: str, name: str) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in _one(kind, name)["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_rbac_grants_what_the_coordinator_and_agent_need() -> None:
    coordinator = _rules("ClusterRole", "fleet-coordinator") | _rules("Role", "fleet-coordinator")
    wanted = {("", r, v) for r in ("nodes", "pods") for v in ("get", "list", "watch")}
    wanted |= {
        ("apps", "deployments/scale", v) for v in ("get", "list", "watch", "update", "patch")
    }
    wanted |= {("coordination.k8s.io", "leases", v) for v in ("create", "get", "update")}
    assert wanted <= coordinator
    assert _rules("ClusterRole", "fleet-agent") == {("", "nodes", "get")}
    for kind in ("Role", "ClusterRole"):
        for role in _of_kind(kind):
            for rule in role["rules"]:
                assert "*" not in rule["verbs"] and "*" not in rule["resources"]


def test_the_coordinator_reads_the_mounted_scheduler_config(tmp_path: Path) -> None:
    """The file ``--scheduler-config`` names is a key of the ConfigMap mounted there, and it
    loads with Fleet's own loader (a config Fleet rejects would stop the coordinator)."""
    from fleet.coordinator.router.config import load_config_file

    container = _container("Deployment", "fleet-coordinator")
    path = Path(_fleet_args(container).scheduler_config)
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    spec = _one("Deployment", "fleet-coordinator")["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    data = _one("ConfigMap", volume["configMap"]["name"])["data"]
    assert path.name in data
    (tmp_path / path.name).write_text(data[path.name])
    profile = load_config_file(tmp_path / path.name)
    assert profile is not None


def test_scheduler_config_is_an_endpoint_picker_config() -> None:
    data = _one("ConfigMap", "fleet-scheduler-config")["data"]
    config = yaml.safe_load(data["scheduler.yaml"])
    assert config["apiVersion"] == "llm-d.ai/v1alpha1"
    assert config["kind"] == "EndpointPickerConfig"
    plugins = {p["type"] for p in config["plugins"]}
    assert {"prefix-cache-scorer", "load-aware-scorer", "max-score-picker"} <= plugins
    profiles = {p["name"]: p for p in config["schedulingProfiles"]}
    assert set(profiles) == {"default"}
    for ref in profiles["default"]["plugins"]:
        assert ref["pluginRef"] in plugins


# -- rendered, when kubectl is here ----------------------------------------------------------


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_renders_the_base() -> None:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None
    result = subprocess.run(
        [kubectl, "kustomize", str(BASE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]
    assert len(rendered) == len(_objects())
    for obj in rendered:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "fleet"
        if obj["kind"] not in {"Namespace", "ClusterRole", "ClusterRoleBinding",
                               "CustomResourceDefinition"}:  # fmt: skip
            assert obj["metadata"]["namespace"] == "fleet-system", obj["metadata"]["name"]
        if obj["kind"] in WORKLOAD_KINDS:
            for container in _containers(obj):
                assert container["image"].startswith("fleet:")
