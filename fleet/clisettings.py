"""The serving commands' flags turned into settings: deployments, scheduling, resilience, API
keys, checks of the perimeter and the Redis URL. Bad values raise ``ConfigError``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fleet.clideployargs import DEFAULT_MODEL


def fake_gpus(args: argparse.Namespace) -> tuple[Any, ...]:
    """The parsed ``--fake-gpus`` (``()`` without it); a bad SPEC raises ConfigError."""
    from fleet.agent.fakenvml import parse_fake_gpus

    return parse_fake_gpus(args.fake_gpus) if args.fake_gpus is not None else ()


def scheduling(args: argparse.Namespace) -> Any:
    """The scheduling profile ``--scheduler-config`` names, loaded (None: the default).

    Raises:
        ConfigError: the file is unreadable or invalid (the message names plugin and profile).
    """
    if not args.scheduler_config:
        return None
    from fleet.coordinator.router.config import load_config_file

    return load_config_file(args.scheduler_config)


def resilience(args: argparse.Namespace) -> Any:
    """The breaker, retry and resume settings, defaults overridden by ``--resilience K=V``.

    Raises:
        ConfigError: an unknown key or a bad value.
    """
    import dataclasses

    from fleet.coordinator.resilience import ResilienceConfig
    from fleet.protocol.errors import ConfigError

    fields = {f.name: f for f in dataclasses.fields(ResilienceConfig)}
    values: dict[str, Any] = {}
    for item in args.resilience:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise ConfigError(
                "--resilience", item, f"needs KEY=VALUE with KEY one of {sorted(fields)}"
            )
        kind = str(fields[key].type)
        try:
            if text.lower() in ("none", "") and "None" in kind:
                values[key] = None
            elif kind.startswith("int"):
                values[key] = int(text)
            else:
                values[key] = float(text)
        except ValueError as exc:
            raise ConfigError("--resilience", item, "the value must be a number") from exc
    return ResilienceConfig(**values)


def api_keys(args: argparse.Namespace) -> Any:
    """The keys ``--api-keys`` lists (an empty set: the API is open).

    Raises:
        ConfigError: the file is unreadable or an entry is bad.
    """
    from fleet.coordinator.apikeys import ApiKeys, load_api_keys

    return load_api_keys(args.api_keys) if args.api_keys else ApiKeys()


def check_perimeter(args: argparse.Namespace, keys: bool) -> None:
    """Refuse to serve beyond loopback without keys (coordinator/perimeter.py).

    Raises:
        ConfigError: ``--host`` is not loopback and a key is missing, without ``--allow-open``.
    """
    from fleet.coordinator.perimeter import open_problem
    from fleet.protocol.errors import ConfigError

    problem = open_problem(
        args.host, admin_key=bool(args.admin_key), api_keys=bool(keys), allow_open=args.allow_open
    )
    if problem is not None:
        raise ConfigError("--host", args.host, problem)


def check_redis_url(args: argparse.Namespace) -> str | None:
    """``--redis-url``, checked (nothing is sent to it).

    Raises:
        ConfigError: not a Redis URL.
    """
    if args.redis_url:
        from fleet.coordinator.redislimits import connect

        connect(args.redis_url, 1.0).close()
    return args.redis_url  # type: ignore[no-any-return]


def _deployments(args: argparse.Namespace) -> tuple[Any, ...]:
    """The command line's one-model shorthand, if it is used: ``--model``, or no
    ``--deployments`` folder nor ``--fleetmodels`` (then the default model)."""
    if args.model is None and (args.deployments or getattr(args, "fleetmodels", None)):
        return ()
    if args.model is None:
        args.model = DEFAULT_MODEL
    return (_deployment(args),)


def _engine_defaults(args: argparse.Namespace) -> Any:
    from fleet.coordinator.deploybook import EngineDefaults

    return EngineDefaults(
        kind=args.engine,
        gpus_per_engine=args.gpus_per_engine,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        extra_args=tuple(args.engine_arg),
    )


def declared(args: argparse.Namespace) -> dict[str, Any]:
    """The CoordinatorConfig settings of declared deployments, from ``up``/``coordinator``
    flags.

    Raises:
        ConfigError: the deployments folder is not a folder.
    """
    from fleet.protocol.errors import ConfigError

    if args.deployments and not Path(args.deployments).is_dir():
        raise ConfigError("--deployments", args.deployments, "must be an existing folder")
    from fleet.coordinator.autoscale import AutoscaleConfig

    autoscale = AutoscaleConfig(
        target_per_engine=args.autoscale_target,
        stable_window_s=args.autoscale_window,
        panic_window_s=args.autoscale_window / 10,
        scale_to_zero_after_s=args.scale_to_zero_after,
    )
    from fleet.coordinator.costmix import parse_speeds
    from fleet.coordinator.costs import parse_prices

    return {
        "autoscale": autoscale,
        "gpu_prices": parse_prices(args.gpu_prices) if args.gpu_prices else {},
        "tier_speeds": parse_speeds(args.tier_speeds) if args.tier_speeds else {},
        "engine_drain_s": args.engine_drain_timeout,
        "deployments": _deployments(args),
        "deployments_dir": str(Path(args.deployments).resolve()) if args.deployments else None,
        "engine_defaults": _engine_defaults(args),
        "admin_key": args.admin_key,
    }


def _deployment(args: argparse.Namespace) -> Any:
    from fleet.coordinator.deployment import Deployment

    model_path = str(Path(args.model).resolve())
    name = args.model_name or Path(args.model).resolve().name
    return Deployment(
        model=name,
        model_path=model_path,
        replicas=args.replicas,
        kind=args.engine,
        gpus_per_engine=args.gpus_per_engine,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        extra_args=tuple(args.engine_arg),
    )


__all__ = [
    "api_keys",
    "check_perimeter",
    "check_redis_url",
    "declared",
    "fake_gpus",
    "resilience",
    "scheduling",
]
