"""Node scale-out through a scale target's ``/scale`` (coordinator/kubescale.py).

The test API server (tests/k8sapi) serves a MachineDeployment-like CRD with Cluster API's scale
subresource. Two fleets run side by side, each a ``fleet coordinator`` with one agent of two
fake GPUs and a deployment of two simulated engines of two GPUs each: one engine fits, the
other lacks two GPUs. The coordinator that acts sets its MachineDeployment from 1 to 2 replicas
through ``/scale``, once; the dry-run one leaves its own at 1, and logs and counts the same
decision.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from kubernetes import client

from fleet.agent.launcher import free_port

from ..k8sapi import running_emulator
from ..k8sapi.machinedeployment import (
    GROUP,
    PLURAL,
    VERSION,
    machine_deployment,
    machine_deployment_crd,
)
from .fleetproc import stop_process

NS = "default"
TIMEOUT_S = 30.0  # a safety bound


def _wait(what: str, check: Callable[[], bool], output: Callable[[], str]) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > TIMEOUT_S:
            raise AssertionError(f"not within {TIMEOUT_S} s: {what}\n{output()}")
        time.sleep(0.1)
    return time.monotonic() - start


def _decisions(url: str, dry_run: str) -> float:
    """fleet_node_scaler_decisions_total{direction="up", dry_run=...} on ``url``'s /metrics."""
    try:
        text = httpx.get(url + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return 0.0
    pattern = rf'fleet_node_scaler_decisions_total{{direction="up",dry_run="{dry_run}"}} (\S+)'
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 0.0


def test_a_gpu_shortfall_patches_the_targets_scale_and_dry_run_only_reports(
    demo_model: Path, tmp_path: Path
) -> None:
    fleet = [sys.executable, "-m", "fleet"]
    procs: list[subprocess.Popen[bytes]] = []
    with running_emulator() as kube, client.ApiClient(client.Configuration(host=kube)) as api:
        client.ApiextensionsV1Api(api).create_custom_resource_definition(
            machine_deployment_crd(), _request_timeout=5
        )
        objects = client.CustomObjectsApi(api)
        for name in ("gpu-act", "gpu-dry"):
            objects.create_namespaced_custom_object(
                GROUP, VERSION, NS, PLURAL, machine_deployment(name, 1), _request_timeout=5
            )

        def replicas(name: str) -> int:
            obj = objects.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)
            return int(obj["spec"]["replicas"])

        urls: dict[str, str] = {}
        try:
            for name, extra in (("act", []), ("dry", ["--node-scale-dry-run"])):
                http, link = free_port(), free_port()
                urls[name] = f"http://127.0.0.1:{http}"
                target = f"{GROUP}/{VERSION}/{PLURAL}/{NS}/gpu-{name}"
                argv = [*fleet, "coordinator", "--port", str(http), "--agent-endpoint",
                        f"tcp://127.0.0.1:{link}", "--model", str(demo_model), "--engine", "sim",
                        "--replicas", "2", "--gpus-per-engine", "2", "--kube-api", kube,
                        "--node-scale-target", target, "--node-scale-gpus-per-node", "2",
                        "--node-scale-min", "1", "--node-scale-max", "3",
                        "--node-scale-interval", "0.2", *extra,
                        "--log-dir", str(tmp_path / name)]  # fmt: skip
                agent = [*fleet, "agent", "--coordinator", f"tcp://127.0.0.1:{link}",
                         "--node-id", f"{name}-n1", "--http-port", "0", "--fake-gpus", "2x80GiB",
                         "--log-dir", str(tmp_path / f"{name}-agent")]  # fmt: skip
                for what, cmd in ((name, argv), (f"{name}-agent", agent)):
                    with open(tmp_path / f"{what}.out", "ab") as out:
                        procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                                      start_new_session=True))  # fmt: skip

            def output() -> str:
                return "".join(f"\n--- {p.name} ---\n" + p.read_text()[-3000:]
                               for p in sorted(tmp_path.glob("*.out")))  # fmt: skip

            took = _wait("gpu-act at 2 replicas", lambda: replicas("gpu-act") == 2, output)
            print(f"\nthe MachineDeployment was scaled {took:.1f} s after the fleet started")
            _wait("the dry run's decision", lambda: _decisions(urls["dry"], "true") >= 1, output)
            assert replicas("gpu-dry") == 1
            assert _decisions(urls["act"], "false") == 1 and _decisions(urls["act"], "true") == 0

            scale = objects.get_namespaced_custom_object_scale(
                GROUP, VERSION, NS, PLURAL, "gpu-act"
            )
            assert scale["spec"]["replicas"] == 2
            logs = {n: (tmp_path / f"{n}.out").read_text() for n in urls}
            decided = (
                "up 1 -> 2 nodes: placement lacks GPUs: 1 more node of 2 GPUs "
                "(short 2 GPUs: demo-1)"
            )
            assert f"node scaler: {decided}" in logs["act"], logs["act"][-3000:]
            assert f"node scaler (dry run): {decided}" in logs["dry"], logs["dry"][-3000:]
            # The shortfall stays (no node joins), but the cool-down holds a second ask.
            time.sleep(1.0)  # five more rounds of the scaler
            assert replicas("gpu-act") == 2 and _decisions(urls["act"], "false") == 1
        finally:
            for proc in procs:
                stop_process(proc)
