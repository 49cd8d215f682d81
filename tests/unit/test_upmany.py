"""``fleet up --coordinators N``'s plain parts: what each coordinator child is told, and the
agent's list of coordinator endpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet import cli
from fleet.agent.config import AgentConfig
from fleet.protocol.errors import ConfigError
from fleet.upmany import child_argv


def test_children_inherit_the_deployment_flags_not_the_up_only_ones() -> None:
    args = cli._parser().parse_args(
        ["up", "--model", "m", "--engine", "sim", "--replicas", "3", "--engine-arg=--seed=1",
         "--engine-arg=--enforce-eager", "--coordinators", "2", "--admin-key", "k",
         "--port", "9000", "--agent-port", "9001", "--fake-gpus", "2x80GiB"]
    )  # fmt: skip
    flags = cli._shared_flags(args, cli._parser_of("up"), cli._parser_of("coordinator"))
    assert flags == ["--model=m", "--admin-key=k", "--engine=sim", "--replicas=3",
                     "--engine-arg=--seed=1", "--engine-arg=--enforce-eager"]  # fmt: skip
    # what a child gets parses as `fleet coordinator` does
    argv = child_argv(flags, index=1, endpoint="tcp://127.0.0.1:5001",
                      lock=Path("/l/leader.lock"), log_dir=Path("/l"), count=3)(7, 8)  # fmt: skip
    assert argv[1:4] == ["-m", "fleet", "coordinator"]
    child = cli._parser().parse_args(argv[3:])
    assert (child.model, child.engine, child.replicas, child.engine_arg, child.admin_key) == (
        "m", "sim", 3, ["--seed=1", "--enforce-eager"], "k",
    )  # fmt: skip
    assert (child.agent_endpoint, child.leader_lock, child.coordinator_id, child.http_fd) == (
        "tcp://127.0.0.1:5001", "/l/leader.lock", "coord-1", 7,
    )  # fmt: skip
    assert child.coordinators_expected == 3  # each holds its share without --redis-url


def test_fewer_than_one_coordinator_is_refused() -> None:
    args = cli._parser().parse_args(["up", "--model", "m", "--coordinators", "0"])
    with pytest.raises(cli.FleetError, match="--coordinators must be at least 1"):
        args.func(args)


def test_an_agent_takes_several_coordinator_endpoints() -> None:
    cfg = AgentConfig(coordinator_endpoint="tcp://a:5555, tcp://b:5555")
    assert cfg.coordinator_endpoints == ("tcp://a:5555", "tcp://b:5555")
    with pytest.raises(ConfigError, match="coordinator_endpoint"):
        AgentConfig(coordinator_endpoint="tcp://a:5555,http://b")
    with pytest.raises(ConfigError, match="repeats"):
        AgentConfig(coordinator_endpoint="tcp://a:5555,tcp://a:5555")
    with pytest.raises(ConfigError, match="coordinator_endpoint"):
        AgentConfig(coordinator_endpoint=" , ")


async def test_several_coordinators_refuse_admin_writes_without_a_shared_folder(
    tmp_path: Path,
) -> None:
    from fleet.coordinator.adminapi import Conflict, delete, put
    from fleet.coordinator.service import Coordinator, CoordinatorConfig

    coord = Coordinator(CoordinatorConfig(port=0, leader_lock=str(tmp_path / "leader.lock")))
    body = (b'{"apiVersion": "fleet.dev/v1alpha1", "kind": "FleetModel", "metadata": {"name":'
            b' "a"}, "spec": {"servedModelNames": ["a"], "source": "/m"}}')  # fmt: skip
    with pytest.raises(Conflict, match="shared --deployments folder"):
        await put(coord, body, None)
    with pytest.raises(Conflict, match="shared --deployments folder"):
        await delete(coord, "a")
    folder = tmp_path / "deployments"
    folder.mkdir()
    shared = Coordinator(CoordinatorConfig(port=0, leader_lock=str(tmp_path / "leader.lock"),
                                           deployments_dir=str(folder)))  # fmt: skip
    _, status = await put(shared, body, None)
    assert status == 201 and (folder / "a.yaml").exists()
