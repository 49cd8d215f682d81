"""Declared deployments (fleet.coordinator.deploybook): FleetModel to Deployment, status."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fleet.coordinator.adminapi import Unauthorized, authorize
from fleet.coordinator.deploybook import API, DeploymentBook, EngineDefaults, status, to_deployment
from fleet.coordinator.deployment import Deployment
from fleet.coordinator.deployspec import parse_model
from fleet.coordinator.placement import Placer
from fleet.coordinator.registry import FleetRegistry
from fleet.protocol.errors import ConfigError
from fleet.protocol.messages import EngineStatus, GpuInfo, Heartbeat, Register


def model(name: str, **spec: Any) -> Any:
    body = {"servedModelNames": [name.split("-")[0]], "source": "/models/m", **spec}
    body = {k: v for k, v in body.items() if v is not None}  # None: leave the field out
    return parse_model(
        {"apiVersion": "fleet.dev/v1alpha1", "kind": "FleetModel", "metadata": {"name": name},
         "spec": body}
    )  # fmt: skip


def test_a_fleet_model_becomes_a_named_deployment_with_its_engine_settings() -> None:
    args = ["--max-model-len=512", "--block-size", "16", "--enforce-eager"]
    m = model("chat-v2", servedModelNames=["chat", "chat-latest"], trafficWeight=10, replicas=3,
              engineArgs=args)  # fmt: skip
    d, notes = to_deployment(m, EngineDefaults(kind="sim", extra_args=("--seed=1",)))
    assert (d.name, d.model, d.aliases, d.replicas, d.traffic_weight) == (
        "chat-v2", "chat", ("chat-latest",), 3, 10,
    )  # fmt: skip
    assert (d.kind, d.max_model_len, d.block_size, d.model_path) == ("sim", 512, 16, "/models/m")
    assert d.extra_args == ("--seed=1", "--enforce-eager")  # the fields' flags go once
    assert notes == []


def test_what_cannot_run_yet_is_said_not_silently_dropped() -> None:
    tp, notes = to_deployment(model("big", tensorParallelSize=2), EngineDefaults())
    assert (tp.replicas, tp.tensor_parallel_size, tp.tp_layout, notes) == (1, 2, "auto", [])
    hf, notes = to_deployment(model("hub", source="hf://org/name@main"), EngineDefaults())
    assert (hf.replicas, hf.model_path, notes) == (1, "hf://org/name@main", [])  # the store's
    auto_model = model("auto", replicas=None, minReplicas=0, maxReplicas=4)
    auto, notes = to_deployment(auto_model, EngineDefaults())
    assert auto.replicas == 0 and notes == []  # minReplicas until the autoscaler says more
    assert to_deployment(auto_model, EngineDefaults(), 3)[0].replicas == 3
    assert to_deployment(auto_model, EngineDefaults(), 9)[0].replicas == 4  # maxReplicas


def test_higher_priority_deployments_are_placed_first() -> None:
    book = DeploymentBook(shorthand=(Deployment("demo", "/m"),))
    book.put(model("low-a", priority=-5))
    book.put(model("high-a", priorityClassName="critical"))
    deployments, _ = book.deployments()
    assert [d.name for d in deployments] == ["high-a", "demo", "low-a"]


def test_each_name_has_one_origin() -> None:
    book = DeploymentBook(shorthand=(Deployment("demo", "/m"),))
    with pytest.raises(ConfigError, match="--model"):
        book.put(model("demo"))
    assert book.put(model("a")) is True and book.put(model("a", replicas=2)) is False
    with pytest.raises(ConfigError, match="admin API"):
        book.set_folder((model("a"),), {"a": "a.yaml"})
    book.set_folder((model("b"),), {"b": "b.yaml"})
    assert [(o, m.name) for o, m in book.models()] == [(API, "a"), ("b.yaml", "b")]
    with pytest.raises(ConfigError, match="b.yaml"):
        book.delete("b")
    assert book.delete("a") is True and book.delete("a") is False


def _node(registry: FleetRegistry, node: str, *engines: EngineStatus, now: float = 0.0) -> None:
    registry.register(Register(node, "", "0", ()), now)
    registry.heartbeat(Heartbeat(node, 1, True, (), engines), now)


def test_status_counts_engines_and_says_why_each_is_not_ready() -> None:
    book = DeploymentBook()
    book.put(model("chat-v1", replicas=3))
    book.put(model("big", tensorParallelSize=2))
    deployments, notes = book.deployments()
    placer = Placer(deployments, assign_timeout_s=30)
    registry = FleetRegistry(lost_after_s=10)
    ready = EngineStatus("chat-v1-0", "chat", "http://127.0.0.1:1", "ready")
    failing = EngineStatus("chat-v1-1", "chat", "http://127.0.0.1:2", "backoff",
                           last_error="exited with 1")  # fmt: skip
    _node(registry, "n1", ready, failing)
    by_name = {s["name"]: s for s in status(placer, registry, book, notes, now=1.0)}
    chat = by_name["chat-v1"]
    assert (chat["desired"], chat["placed"], chat["ready"]) == (3, 2, 1)
    assert chat["reasons"]["chat-v1-1"] == "backoff on node n1: exited with 1"
    assert chat["reasons"]["chat-v1-2"] == "being placed"
    assert "chat-v1-0" not in chat["reasons"]
    placer.reconcile(registry, now=1.0)  # chat-v1-2 is assigned now
    chat = {s["name"]: s for s in status(placer, registry, book, notes, now=3.0)}["chat-v1"]
    assert chat["reasons"]["chat-v1-2"] == "assigned to node n1 2 s ago, not reported yet"
    big = by_name["big"]  # a tensor-parallel group is one engine, placed by TPGroups
    assert (big["desired"], big["placed"]) == (1, 0) and "deployment" not in big["reasons"]


def test_status_of_an_engine_with_no_node() -> None:
    book = DeploymentBook()
    book.put(model("solo"))
    deployments, notes = book.deployments()
    placer = Placer(deployments, assign_timeout_s=30, settle_until=5.0)
    registry = FleetRegistry(lost_after_s=10)
    (solo,) = status(placer, registry, book, notes, now=1.0)
    assert solo["reasons"]["solo-0"].startswith("waiting for every node to report")
    (solo,) = status(placer, registry, book, notes, now=6.0)
    assert solo["reasons"]["solo-0"] == "no live node"


class _Coord:
    class cfg:  # noqa: N801 - the shape adminapi reads
        admin_key = "s3cret"


def test_the_admin_key_is_required_when_set() -> None:
    authorize(_Coord(), {"authorization": "Bearer s3cret"})  # type: ignore[arg-type]
    for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "s3cret"}):
        with pytest.raises(Unauthorized):
            authorize(_Coord(), headers)  # type: ignore[arg-type]


def test_status_of_a_tensor_parallel_group() -> None:
    from fleet.coordinator.tpgroups import TPGroups

    book = DeploymentBook()
    book.put(model("big", tensorParallelSize=2))
    deployments, notes = book.deployments()
    placer = Placer(deployments, assign_timeout_s=30)
    registry = FleetRegistry(lost_after_s=10)
    groups = TPGroups(assign_timeout_s=30)
    (big,) = status(placer, registry, book, notes, now=1.0, groups=groups)
    assert big["reasons"]["big-0"] == "needs 2 healthy nodes (one rank each); 0 live"
    rank0 = EngineStatus("big-0", "big", "http://127.0.0.1:1", "ready", group="big-0", nnodes=2,
                         master_addr="127.0.0.1", master_port=29500)  # fmt: skip
    _node(registry, "n1", rank0)
    (big,) = status(placer, registry, book, notes, now=1.0, groups=groups)
    assert big["ready"] == 0  # rank 0 alone is not a group
    assert big["reasons"]["big-0"] == "rank 0 ready on node n1; waiting for every other rank"


def test_when_gpus_run_short_the_higher_priority_deployment_gets_them() -> None:
    book = DeploymentBook(defaults=EngineDefaults(gpus_per_engine=1))
    book.put(model("batch-a", priorityClassName="low", gpuTier=["a100"]))
    book.put(model("chat-a", priorityClassName="high"))
    deployments, _ = book.deployments()
    assert {d.name: d.tiers for d in deployments} == {"chat-a": (), "batch-a": ("a100",)}
    registry = FleetRegistry(lost_after_s=10.0)
    one = GpuInfo(index=0, uuid="GPU-0", name="NVIDIA A100-SXM4-80GB", memory_total_bytes=80 << 30,
                  memory_used_bytes=0, utilization_pct=0.0, temperature_c=30.0, power_w=70.0,
                  ecc_uncorrected=0, healthy=True)  # fmt: skip
    registry.register(Register(node_id="a", agent_url="", agent_version="0", gpus=(one,)), 0.0)
    placer = Placer(deployments, assign_timeout_s=30.0)
    (placement,) = placer.reconcile(registry, now=0.0)
    # the A100 batch-a prefers goes to chat-a, which ranks higher
    assert placement.assign.spec.engine_id == "chat-a-0"
    batch = next(d for d in deployments if d.name == "batch-a")
    assert placer.why_unplaced(batch, registry, now=0.0) == (
        "needs 1 free GPU on one node; most: node a has 0"
    )


def test_roles_launch_prefill_and_decode_engines_with_the_deployments_connector_args() -> None:
    nixl = '--kv-transfer-config={"kv_connector":"NixlConnector","kv_role":"kv_both"}'
    m = model("chat-pd", replicas=None, roles={"prefill": 1, "decode": 2}, engineArgs=[nixl])
    d, notes = to_deployment(m, EngineDefaults(kind="sim"))
    assert notes == []
    assert d.engine_ids() == ["chat-pd-prefill-0", "chat-pd-decode-0", "chat-pd-decode-1"]
    specs = [d.spec(e, ()) for e in d.engine_ids()]
    assert [s.role for s in specs] == ["prefill", "decode", "decode"]
    assert all(s.extra_args == (nixl,) for s in specs)  # the KV connector, from the deployment
    registry = FleetRegistry(lost_after_s=10.0)
    registry.register(Register(node_id="a", agent_url="", agent_version="0"), 0.0)
    placements = Placer([d], assign_timeout_s=30.0).reconcile(registry, now=0.0)
    assert sorted((p.assign.spec.engine_id, p.assign.spec.role) for p in placements) == [
        ("chat-pd-decode-0", "decode"), ("chat-pd-decode-1", "decode"),
        ("chat-pd-prefill-0", "prefill"),
    ]  # fmt: skip
    # the agent reports the role it launched with; the registry's view carries it
    status = EngineStatus(engine_id="chat-pd-prefill-0", model="chat", url="http://a:1",
                          state="ready", role=specs[0].role)  # fmt: skip
    registry.register(Register("a", "", "0", (), (status,)), 1.0)
    assert registry.engine("chat-pd-prefill-0").role == "prefill"  # type: ignore[union-attr]
    # without a connector in the engine args: said, not silent
    bare = model("chat-pd", replicas=None, roles={"prefill": 1, "decode": 1})
    assert "--kv-transfer-config" in to_deployment(bare, EngineDefaults())[1][0]
    with pytest.raises(ConfigError):
        Deployment("x", "/m", replicas=3, roles=(1, 1))


def test_a_connector_without_kv_role_gets_each_engines_role() -> None:
    example = {"kv_connector": "ExampleConnector", "kv_connector_extra_config": {"a": 1}}
    given = json.dumps(example)
    args = ["--enforce-eager", "--kv_transfer_config", given, "--seed=1"]
    m = model("chat-pd", replicas=None, roles={"prefill": 1, "decode": 1}, engineArgs=args)
    d, _ = to_deployment(m, EngineDefaults())
    specs = {e: d.spec(e, ()) for e in d.engine_ids()}
    for engine_id, kv_role in (("chat-pd-prefill-0", "kv_producer"),
                               ("chat-pd-decode-0", "kv_consumer")):  # fmt: skip
        args = specs[engine_id].extra_args
        assert args[:2] == ("--enforce-eager", "--kv_transfer_config")
        assert args[3:] == ("--seed=1",)
        assert json.loads(args[2]) == {**example, "kv_role": kv_role}
    # without roles every engine does both; the --flag=JSON form works alike
    both = model("chat", engineArgs=[f"--kv-transfer-config={given}"])
    (arg,) = to_deployment(both, EngineDefaults())[0].spec("chat-0", ()).extra_args
    flag, _, text = arg.partition("=")
    assert flag == "--kv-transfer-config"
    assert json.loads(text) == {**example, "kv_role": "kv_both"}
    # a malformed config or kv_role is refused at load, naming the argument
    for bad, why in (("{not json", "must be a JSON object"), ('{"kv_role": "kv_p"}', "kv_role")):
        with pytest.raises(ConfigError, match=why):
            model("x", engineArgs=["--kv-transfer-config", bad])
