"""The node scaler's flags of ``fleet coordinator`` (docs/DEPLOYMENTS.md, "Node scale-out")."""

from __future__ import annotations

import argparse
from typing import Any


def add_node_scale_args(p: argparse.ArgumentParser) -> None:
    """``--node-scale-target`` and the settings that go with it."""
    p.add_argument(
        "--node-scale-target",
        default=None,
        metavar="GROUP/VERSION/PLURAL/NAMESPACE/NAME",
        help="when placement lacks GPUs, the leader asks for nodes by patching this "
        "resource's /scale, e.g. a Cluster API MachineDeployment: "
        "cluster.x-k8s.io/v1beta1/machinedeployments/NAMESPACE/NAME (default: never)",
    )
    p.add_argument(
        "--node-scale-gpus-per-node",
        type=int,
        default=None,
        metavar="N",
        help="GPUs each node of the target has (required with --node-scale-target)",
    )
    p.add_argument(
        "--node-scale-min",
        type=int,
        default=0,
        metavar="N",
        help="fewest replicas the target is left with (default %(default)s)",
    )
    p.add_argument(
        "--node-scale-max",
        type=int,
        default=None,
        metavar="N",
        help="most replicas the target is set to (required with --node-scale-target)",
    )
    p.add_argument(
        "--node-scale-cooldown",
        type=float,
        default=300.0,
        metavar="S",
        help="after a scale-up, ask again only this much later, when the nodes had time to "
        "join; scale-downs are this far apart (default %(default)s)",
    )
    p.add_argument(
        "--node-scale-idle",
        type=float,
        default=600.0,
        metavar="S",
        help="a node that ran no engine this long is given back, one at a time, while "
        "nothing lacks GPUs (default %(default)s)",
    )
    p.add_argument(
        "--node-scale-interval",
        type=float,
        default=10.0,
        metavar="S",
        help="how often the target is read and a decision made (default %(default)s)",
    )
    p.add_argument(
        "--node-scale-dry-run",
        action="store_true",
        help="decide, log and count in /metrics, but never write the target",
    )


def node_scale_config(args: argparse.Namespace) -> Any:
    """The ``NodeScaleConfig`` of the flags (None without ``--node-scale-target``).

    Raises:
        ConfigError: a bad or missing value (names the flag's key).
    """
    from fleet.coordinator.nodescale import NodeScaleConfig, ScaleTarget
    from fleet.protocol.errors import ConfigError

    if args.node_scale_target is None:
        return None
    target = ScaleTarget.parse(args.node_scale_target)
    for key in ("node_scale_gpus_per_node", "node_scale_max"):
        if getattr(args, key) is None:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(flag, None, "is required with --node-scale-target")
    return NodeScaleConfig(
        target,
        gpus_per_node=args.node_scale_gpus_per_node,
        min_nodes=args.node_scale_min,
        max_nodes=args.node_scale_max,
        cooldown_s=args.node_scale_cooldown,
        idle_s=args.node_scale_idle,
        interval_s=args.node_scale_interval,
        dry_run=args.node_scale_dry_run,
    )


__all__ = ["add_node_scale_args", "node_scale_config"]
