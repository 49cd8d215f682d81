"""Loading deployments from a folder of YAML files (fleet.coordinator.deployload): several
documents per file, every problem of every file in one error, checks across deployments."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.coordinator.deployload import check_fleet, load_folder, parse_documents
from fleet.coordinator.deployspec import parse_model
from fleet.coordinator.errors import DeploymentsError

CHAT = """\
apiVersion: fleet.dev/v1alpha1
kind: FleetModel
metadata: {name: chat-v1}
spec:
  servedModelNames: [chat]
  source: /models/demo
  version: v1
  trafficWeight: 90
---
# the canary
apiVersion: fleet.dev/v1alpha1
kind: FleetModel
metadata: {name: chat-v2}
spec:
  servedModelNames: [chat]
  source: hf://org/model@rev
  version: v2
  trafficWeight: 10
  replicas: 2
  tensorParallelSize: 1
  engineArgs: ["--max-model-len=1024"]
---
"""

EMBED = """\
{"apiVersion": "fleet.dev/v1alpha1", "kind": "FleetModel", "metadata": {"name": "embed"},
 "spec": {"source": "file:///models/embed", "priorityClassName": "low"}}
"""


def write(folder: Path, **files: str) -> Path:
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def test_folder_with_several_files_and_documents(tmp_path: Path) -> None:
    write(
        tmp_path,
        **{
            "chat.yaml": CHAT,
            "embed.json": EMBED,
            "notes.txt": "not yaml: [",
            ".chat.yaml.swp": "garbage: [",
        },
    )
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", **{"x.yaml": "garbage: ["})
    models = load_folder(tmp_path)
    assert [m.name for m in models] == ["chat-v1", "chat-v2", "embed"]
    assert [m.traffic_weight for m in models] == [90, 10, 100]
    assert models[2].effective_priority == -100


def test_an_empty_folder_has_no_deployments(tmp_path: Path) -> None:
    assert load_folder(tmp_path) == ()


def test_one_error_lists_every_problem_with_its_file(tmp_path: Path) -> None:
    write(
        tmp_path,
        **{
            "a.yaml": CHAT.replace("trafficWeight: 10", "trafficWeight: ten"),
            "b.yaml": "apiVersion: fleet.dev/v1alpha1\nkind: FleetModel\nmetadata: {name: b}\n"
            "spec: {source: /m, replicas: -1, tensorParallelSize: 0}\n",
            "c.yml": "spec: [unclosed\n",
            "d.yaml": CHAT.split("---")[0],  # chat-v1 again
        },
    )
    with pytest.raises(DeploymentsError) as info:
        load_folder(tmp_path)
    assert info.value.lines == (
        "a.yaml (document 2): deployment 'chat-v2': spec.trafficWeight: must be an integer in "
        "0..1000000, got 'ten'",
        "b.yaml: deployment 'b': spec.tensorParallelSize: must be an integer >= 1, got 0",
        "b.yaml: deployment 'b': spec.replicas: must be an integer >= 0, got -1",
        "c.yml: line 2 column 1 not valid YAML: expected ',' or ']', but got '<stream end>'",
        "d.yaml: deployment 'chat-v1': metadata.name: already defined in a.yaml",
    )
    assert str(info.value).startswith(f"{tmp_path}: 5 problems:\n  a.yaml (document 2): ")


def test_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DeploymentsError, match="cannot read the folder"):
        load_folder(tmp_path / "nope")


def test_non_mapping_documents_and_duplicates_in_one_file() -> None:
    models, problems = parse_documents(
        "- a\n---\n" + CHAT.split("---")[0] + "---\n" + CHAT.split("---")[0], "x.yaml"
    )
    assert problems == ["x.yaml (document 1): deployment '?': (document): must be a map, got ['a']"]
    assert [m.name for m in models] == ["chat-v1", "chat-v1"]
    assert check_fleet(models) == [
        ("chat-v1", "deployment 'chat-v1': metadata.name: defined twice")
    ]


def test_a_served_name_needs_one_weight_above_zero(tmp_path: Path) -> None:
    write(
        tmp_path,
        **{
            "chat.yaml": CHAT.replace("trafficWeight: 90", "trafficWeight: 0").replace(
                "trafficWeight: 10", "trafficWeight: 0"
            )
        },
    )
    with pytest.raises(DeploymentsError) as info:
        load_folder(tmp_path)
    assert info.value.lines == tuple(
        f"chat.yaml: deployment '{n}': spec.trafficWeight: every deployment serving 'chat' has "
        "weight 0 (chat-v1, chat-v2); one needs a weight > 0"
        for n in ("chat-v1", "chat-v2")
    )


def test_loaded_deployments_round_trip(tmp_path: Path) -> None:
    write(tmp_path, **{"chat.yaml": CHAT})
    for m in load_folder(tmp_path):
        assert parse_model(m.to_dict()) == m
