"""The FleetModel schema (fleet.coordinator.deployspec): parsing, every error naming the deployment
and the field, and the round trip back to the document."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from fleet.coordinator.deployspec import FleetModel, Roles, parse_model
from fleet.coordinator.engineargs import EngineArgs, check_engine_args, human_int
from fleet.coordinator.errors import DeploymentError
from fleet.coordinator.modelsource import ModelSource
from fleet.protocol.errors import ConfigError

ISSUE_EXAMPLE: dict[str, Any] = {
    "apiVersion": "fleet.dev/v1alpha1",
    "kind": "FleetModel",
    "metadata": {"name": "chat-v2"},
    "spec": {
        "servedModelNames": ["chat"],
        "source": "hf://org/model@rev",
        "version": "v2",
        "trafficWeight": 10,
        "replicas": 2,
        "tensorParallelSize": 1,
        "engineArgs": ["--max-model-len=1024"],
    },
}


def doc(name: str = "chat-v2", **spec: Any) -> dict[str, Any]:
    d = copy.deepcopy(ISSUE_EXAMPLE)
    d["metadata"]["name"] = name
    d["spec"].update(spec)
    return d


def errors(d: object) -> list[str]:
    with pytest.raises(DeploymentError) as info:
        parse_model(d)
    return list(info.value.lines)


def test_the_issue_example_parses() -> None:
    m = parse_model(ISSUE_EXAMPLE)
    assert m == FleetModel(
        name="chat-v2",
        served_model_names=("chat",),
        source=ModelSource(
            uri="hf://org/model@rev", scheme="hf", location="org/model", revision="rev"
        ),
        version="v2",
        traffic_weight=10,
        replicas=2,
        tensor_parallel_size=1,
        engine_args=("--max-model-len=1024",),
    )
    assert m.engine == EngineArgs(max_model_len=1024)
    assert m.engine_slots() == (("chat-v2-0", "both"), ("chat-v2-1", "both"))
    assert m.effective_priority == 0


def test_minimal_document_gets_documented_defaults() -> None:
    m = parse_model(
        {
            "apiVersion": "fleet.dev/v1alpha1",
            "kind": "FleetModel",
            "metadata": {"name": "tiny"},
            "spec": {"source": "/models/tiny"},
        }
    )
    assert m.served_model_names == ("tiny",)
    assert (m.replicas, m.tensor_parallel_size, m.traffic_weight) == (1, 1, 100)
    assert m.source == ModelSource(uri="/models/tiny", scheme="path", location="/models/tiny")
    assert m.to_dict() == {
        "apiVersion": "fleet.dev/v1alpha1",
        "kind": "FleetModel",
        "metadata": {"name": "tiny"},
        "spec": {
            "servedModelNames": ["tiny"],
            "source": "/models/tiny",
            "trafficWeight": 100,
            "replicas": 1,
            "tensorParallelSize": 1,
            "engineArgs": [],
        },
    }


FULL: dict[str, Any] = {
    "apiVersion": "fleet.dev/v1alpha1",
    "kind": "FleetModel",
    "metadata": {
        "name": "big",
        "namespace": "serving",
        "labels": {"team": "search", "fleet.dev/tier": "gold"},
        "annotations": {"note": "anything at all"},
    },
    "spec": {
        "servedModelNames": ["big", "big-latest"],
        "source": "s3://models-bucket/llama/70b",
        "version": "2024-06",
        "trafficWeight": 90,
        "minReplicas": 1,
        "maxReplicas": 4,
        "tensorParallelSize": 4,
        "engineArgs": ["--gpu-memory-utilization", "0.85", "--enforce-eager"],
        "priorityClassName": "high",
        "gpuTier": ["h100", "a100"],
    },
}


@pytest.mark.parametrize(
    "d",
    [
        ISSUE_EXAMPLE,
        FULL,
        doc(roles={"prefill": 1, "decode": 3}, replicas=None),
        doc(priority=-5),
    ],
    ids=["issue", "full", "roles", "priority"],
)
def test_round_trip(d: dict[str, Any]) -> None:
    d = copy.deepcopy(d)
    if d["spec"].get("replicas", 0) is None:
        del d["spec"]["replicas"]
    m = parse_model(d)
    assert m.to_dict() == d
    assert parse_model(m.to_dict()) == m


def test_full_document_fields() -> None:
    m = parse_model(FULL)
    assert m.labels == (("fleet.dev/tier", "gold"), ("team", "search"))
    assert (m.replicas, m.min_replicas, m.max_replicas) == (None, 1, 4)
    assert m.effective_priority == 100
    assert m.gpu_tiers == ("h100", "a100")
    assert m.engine.gpu_memory_utilization == 0.85
    assert m.source.location == "models-bucket/llama/70b"
    assert m.engine_slots() == (("big-0", "both"),)  # the autoscaler's floor
    assert m.engine_slots(9) == tuple((f"big-{i}", "both") for i in range(4))  # clamped


def test_roles_give_prefill_and_decode_slots() -> None:
    spec = copy.deepcopy(ISSUE_EXAMPLE["spec"])
    del spec["replicas"]
    m = parse_model(dict(ISSUE_EXAMPLE, spec=dict(spec, roles={"prefill": 1, "decode": 2})))
    assert m.roles == Roles(prefill=1, decode=2)
    assert m.engine_slots() == (
        ("chat-v2-prefill-0", "prefill"),
        ("chat-v2-decode-0", "decode"),
        ("chat-v2-decode-1", "decode"),
    )


def test_error_names_the_deployment_and_the_field() -> None:
    with pytest.raises(DeploymentError) as info:
        parse_model(doc(tensorParallelSize=0))
    assert str(info.value) == (
        "deployment 'chat-v2': spec.tensorParallelSize: must be an integer >= 1, got 0"
    )
    assert isinstance(info.value, ConfigError)
    assert info.value.key == "spec.tensorParallelSize"
    assert info.value.deployment == "chat-v2"


@pytest.mark.parametrize(
    ("spec", "line"),
    [
        ({"replicas": -1}, "spec.replicas: must be an integer >= 0, got -1"),
        ({"replicas": True}, "spec.replicas: must be an integer >= 0, got True"),
        ({"replicas": "2"}, "spec.replicas: must be an integer >= 0, got '2'"),
        ({"trafficWeight": -3}, "spec.trafficWeight: must be an integer in 0..1000000, got -3"),
        ({"tensorParallelSize": 1.5}, "spec.tensorParallelSize: must be an integer >= 1, got 1.5"),
        ({"servedModelNames": []}, "spec.servedModelNames: must not be empty"),
        (
            {"servedModelNames": "chat"},
            "spec.servedModelNames: must be a list of strings, got 'chat'",
        ),
        (
            {"servedModelNames": ["chat", "chat"]},
            "spec.servedModelNames[1]: 'chat' is listed twice",
        ),
        (
            {"servedModelNames": ["a b"]},
            "spec.servedModelNames[0]: must be 1..256 characters without spaces, got 'a b'",
        ),
        (
            {"source": "gs://bucket/x"},
            "spec.source: scheme 'gs' is not supported; use a path, file://, http(s)://, "
            "s3://BUCKET[/PREFIX] or hf://ORG/NAME[@REV], got 'gs://bucket/x'",
        ),
        (
            {"source": "hf://just-a-name"},
            "spec.source: must be hf://ORG/NAME or hf://ORG/NAME@REVISION, got 'hf://just-a-name'",
        ),
        (
            {"source": "file://relative/x"},
            "spec.source: must be file:///ABSOLUTE/PATH, got 'file://relative/x'",
        ),
        (
            {"source": "https:///nohost"},
            "spec.source: must be https://HOST/PATH, got 'https:///nohost'",
        ),
        (
            {"source": "s3://A/x"},
            "spec.source: must be s3://BUCKET[/PREFIX] with a valid bucket name, got 's3://A/x'",
        ),
        ({"source": 7}, "spec.source: must be a string, got 7"),
        ({"replica": 2}, "spec.replica: unknown field (did you mean replicas?)"),
        ({"labels": {"a": "b"}}, "spec.labels: unknown field (it belongs in metadata.labels)"),
        ({"minReplicas": 1}, "spec.minReplicas: cannot be combined with spec.replicas"),
        (
            {"engineArgs": ["--tensor-parallel-size", "2"]},
            "spec.engineArgs[0]: --tensor-parallel-size is set by Fleet: "
            "set spec.tensorParallelSize",
        ),
        (
            {"engineArgs": ["--max_model_len", "0"]},
            "spec.engineArgs[0]: --max-model-len must be an integer >= 1 or auto, got '0'",
        ),
        (
            {"engineArgs": ["--gpu-memory-utilization=1.2"]},
            "spec.engineArgs[0]: --gpu-memory-utilization must be a number in (0, 1], got '1.2'",
        ),
        ({"engineArgs": ["--max-num-seqs"]}, "spec.engineArgs[0]: --max-num-seqs needs a value"),
        ({"engineArgs": [3]}, "spec.engineArgs[0]: must be a string, got 3"),
        (
            {"priorityClassName": "urgent"},
            "spec.priorityClassName: must be one of critical, high, normal, low, got 'urgent'",
        ),
        (
            {"priority": 10**9},
            "spec.priority: must be an integer in -1000000..1000000, got 1000000000",
        ),
        (
            {"gpuTier": ["H100"]},
            "spec.gpuTier[0]: must be a lower-case tier name (a-z, 0-9, '-', '_', '.'), got 'H100'",
        ),
        ({"version": 2}, "spec.version: must be a string of at most 63 characters, got 2"),
    ],
)
def test_each_field_is_checked(spec: dict[str, Any], line: str) -> None:
    assert errors(doc(**spec)) == [f"deployment 'chat-v2': {line}"]


def test_replica_forms_are_exclusive() -> None:
    base = copy.deepcopy(ISSUE_EXAMPLE)
    del base["spec"]["replicas"]
    d = copy.deepcopy(base)
    d["spec"].update(minReplicas=3, maxReplicas=2)
    assert errors(d) == [
        "deployment 'chat-v2': spec.maxReplicas: must be >= spec.minReplicas (3), got 2"
    ]
    d = copy.deepcopy(base)
    d["spec"].update(maxReplicas=2)
    assert errors(d) == ["deployment 'chat-v2': spec.minReplicas: required with spec.maxReplicas"]
    d = copy.deepcopy(base)
    d["spec"].update(roles={"prefill": 0, "decode": 1, "both": 1}, replicas=1)
    assert errors(d) == [
        "deployment 'chat-v2': spec.replicas: cannot be combined with spec.roles "
        "(roles give the counts)",
        "deployment 'chat-v2': spec.roles.both: unknown field (known: prefill, decode)",
        "deployment 'chat-v2': spec.roles.prefill: must be an integer >= 1, got 0",
    ]


def test_every_problem_of_a_document_is_reported() -> None:
    lines = errors(
        {
            "apiVersion": "fleet.dev/v2",
            "kind": "Deployment",
            "metadata": {"name": "Bad_Name", "labels": {"ok": True}},
            "spec": {"tensorParallelSize": 0, "priority": 1, "priorityClassName": "low"},
            "status": {},
        }
    )
    assert lines == [
        "deployment 'Bad_Name': status: unknown field (known: apiVersion, kind, metadata, spec)",
        "deployment 'Bad_Name': apiVersion: must be 'fleet.dev/v1alpha1', got 'fleet.dev/v2'",
        "deployment 'Bad_Name': kind: must be 'FleetModel', got 'Deployment'",
        "deployment 'Bad_Name': spec.source: required",
        "deployment 'Bad_Name': metadata.name: must be a DNS label (a-z, 0-9, '-', at most 63 "
        "characters), got 'Bad_Name'",
        "deployment 'Bad_Name': metadata.labels.ok: must be a string (quote it in YAML), got True",
        "deployment 'Bad_Name': spec.tensorParallelSize: must be an integer >= 1, got 0",
        "deployment 'Bad_Name': spec.priority: give either spec.priority or spec.priorityClassName",
    ]


def test_a_document_without_a_name_or_not_a_map() -> None:
    assert errors(
        {"apiVersion": "fleet.dev/v1alpha1", "kind": "FleetModel", "spec": {"source": "/m"}}
    ) == [
        "deployment '?': metadata: required",
    ]
    assert errors(["a"]) == ["deployment '?': (document): must be a map, got ['a']"]


def test_label_syntax() -> None:
    d = doc()
    d["metadata"]["labels"] = {"bad key!": "x", "ok": "-bad-value"}
    assert errors(d) == [
        "deployment 'chat-v2': metadata.labels.bad key!: key must be a Kubernetes label name "
        "([prefix/]name, name at most 63 characters), got 'x'",
        "deployment 'chat-v2': metadata.labels.ok: value must be a Kubernetes label value (at "
        "most 63 characters, A-Z a-z 0-9 -_.), got '-bad-value'",
    ]


@pytest.mark.parametrize(
    ("uri", "scheme", "location", "revision"),
    [
        ("models/demo", "path", "models/demo", ""),
        ("file:///srv/models/demo", "file", "/srv/models/demo", ""),
        ("file://localhost/srv/m%20x", "file", "/srv/m x", ""),
        ("http://mirror:8080/models/demo/", "http", "http://mirror:8080/models/demo/", ""),
        ("https://example.org/m/manifest.json", "https", "https://example.org/m/manifest.json", ""),
        ("s3://my-bucket", "s3", "my-bucket", ""),
        ("s3://my-bucket/a/b/", "s3", "my-bucket/a/b", ""),
        ("hf://Qwen/Qwen2.5-0.5B", "hf", "Qwen/Qwen2.5-0.5B", ""),
        ("hf://org/name@refs/pr/1", "hf", "org/name", "refs/pr/1"),
    ],
)
def test_sources(uri: str, scheme: str, location: str, revision: str) -> None:
    assert ModelSource.parse(uri) == ModelSource(uri, scheme, location, revision)  # type: ignore[arg-type]


def test_engine_args_forms() -> None:
    args = EngineArgs.parse(
        (
            "--gpu_memory_utilization=0.5",
            "--max-model-len",
            "32K",
            "--kv-cache-memory-bytes",
            "2G",
            "--max-num-batched-tokens",
            "8k",
            "--enforce-eager",
            "--max-num-seqs",
            "64",
            "--block-size=16",
            "--dtype",
            "bfloat16",
            "--kv-cache-dtype",
            "fp8",
            "--some-future-flag",
            "-1",
        )
    )
    assert args == EngineArgs(
        gpu_memory_utilization=0.5,
        max_model_len=32 * 1024,
        kv_cache_memory_bytes=2 << 30,
        max_num_batched_tokens=8000,
        max_num_seqs=64,
        block_size=16,
        dtype="bfloat16",
        kv_cache_dtype="fp8",
        enforce_eager=True,
    )
    assert EngineArgs.parse(("--max-model-len", "auto")).max_model_len == -1
    assert not EngineArgs.parse(("--enforce-eager", "--no-enforce-eager")).enforce_eager
    assert check_engine_args(("--max-model-len=1k", "--max-model-len=2k")) == [
        ("[1]", "--max-model-len is given twice (first at [0])")
    ]
    with pytest.raises(ConfigError, match=r"engineArgs\[0\]"):
        EngineArgs.parse(
            (
                "--dtype",
                "int3",
            )
        )
    assert human_int("25.6k") == 25600
    with pytest.raises(ValueError):
        human_int("1.5K")
