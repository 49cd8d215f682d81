"""A Cluster API MachineDeployment stand-in: its CRD's scale subresource, nothing else.

Cluster API's own CRD (cluster.x-k8s.io/v1beta1) declares ``subresources.scale`` with these
three paths; its schema is left open here, as the emulator validates no schema anyway.
"""

from typing import Any

GROUP, VERSION, PLURAL, KIND = (
    "cluster.x-k8s.io",
    "v1beta1",
    "machinedeployments",
    "MachineDeployment",
)


def machine_deployment_crd(*, scale: bool = True) -> dict[str, Any]:
    """The CRD (``scale``: declare the scale subresource, as Cluster API's does)."""
    subresources: dict[str, Any] = {"status": {}}
    if scale:
        subresources["scale"] = {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        }
    schema = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "plural": PLURAL, "singular": "machinedeployment"},
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": subresources,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def machine_deployment(name: str, replicas: int | None) -> dict[str, Any]:
    """A MachineDeployment of ``replicas`` machines (None: spec.replicas left out)."""
    spec: dict[str, Any] = {"clusterName": "gpu", "template": {"spec": {}}}
    if replicas is not None:
        spec["replicas"] = replicas
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name},
        "spec": spec,
    }


__all__ = ["GROUP", "KIND", "PLURAL", "VERSION", "machine_deployment", "machine_deployment_crd"]
