"""Running the serving commands: ``fleet up``, ``fleet coordinator`` (also under a hot
restart) and ``fleet agent``, with their logging and tracing."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fleet import heap, logjson
from fleet.clisettings import (
    api_keys,
    check_perimeter,
    check_redis_url,
    declared,
    fake_gpus,
    resilience,
    scheduling,
)
from fleet.keyscli import client_keys, server_keys, up_keys
from fleet.nodescalecli import node_scale_config
from fleet.protocol.errors import FleetError
from fleet.respcachecli import response_cache_config
from fleet.storecli import store_config, tokenizer_files


def cmd_up(args: argparse.Namespace) -> int:
    import trio

    from fleet.up import run_up

    if args.coordinators < 1:
        raise FleetError(f"--coordinators must be at least 1, not {args.coordinators}")
    _setup_logging(args.log_dir, verbose_stderr=False, log_format=args.log_format)
    # bad flags fail before anything starts
    settings = (declared(args), scheduling(args), resilience(args), api_keys(args))
    check_perimeter(args, settings[3].enabled)
    check_redis_url(args)
    args.response_cache_cfg = response_cache_config(args)
    args.fake_gpus = fake_gpus(args)
    args.store = store_config(args)
    args.tokenizer_files = tokenizer_files(args)
    args.curve = up_keys(args)  # (coordinator's, agent's) or None
    model = Path(args.model) if args.model is not None else None
    if model is not None and not (model / "config.json").exists():
        if not args.build_demo_model:
            raise FleetError(
                f"no model at {model} (build one with `fleet demo-model {model}`, "
                "or pass --build-demo-model)"
            )
        from fleet.demomodel import build_demo_model

        print(f"• building the demo model at {model} (offline, about 10 s)", flush=True)
        build_demo_model(model)
    if args.coordinators > 1:
        from fleet.cli import parser_of
        from fleet.upmany import run_up_many

        flags = shared_flags(args, parser_of("up"), parser_of("coordinator"))
        return trio.run(run_up_many, args, flags, args.coordinators)
    with _tracing(args):
        heap.freeze()  # what start-up loaded lives as long as the process
        return trio.run(run_up, args, *settings)


#: ``fleet up`` options a ``fleet coordinator`` child of ``--coordinators N`` does not inherit
#: (``--curve-keys DIR``: the children get ``DIR/coordinator``, fleet/upmany.py).
_UP_ONLY = {"host", "port", "log_dir", "func", "command", "curve_keys"}


def shared_flags(
    args: argparse.Namespace, source: argparse.ArgumentParser, target: argparse.ArgumentParser
) -> list[str]:
    """The options ``args`` (parsed by ``source``) set away from their defaults that
    ``target`` takes too, as ``--flag=value`` arguments."""
    dests = {a.dest for a in target._actions if a.option_strings} - _UP_ONLY
    out: list[str] = []
    for action in source._actions:
        if action.dest not in dests or not action.option_strings:
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default or value is None:
            continue
        flag = next(o for o in action.option_strings if o.startswith("--"))
        if isinstance(action, argparse._StoreTrueAction):
            out.append(flag)
        elif isinstance(action, argparse._AppendAction):
            out += [f"{flag}={v}" for v in value]
        else:
            out.append(f"{flag}={value}")
    return out


def cmd_coordinator(args: argparse.Namespace) -> int:
    import trio

    from fleet.coordinator.service import Coordinator, CoordinatorConfig

    _setup_logging(args.log_dir, verbose_stderr=True, log_format=args.log_format)
    keys = api_keys(args)
    if args.http_fd is None:  # a child of `fleet up --coordinators N`: its parent checked
        check_perimeter(args, keys.enabled)
    cfg = CoordinatorConfig(
        host=args.host,
        port=args.port,
        agent_endpoint=args.agent_endpoint,
        **declared(args),
        max_body_bytes=args.max_body_bytes,
        kv_index_max_entries=args.kv_index_max_entries,
        slots_per_engine=args.engine_slots,
        max_queue=args.max_queue,
        max_queue_wait_s=args.max_queue_wait,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        redis_url=check_redis_url(args),
        coordinators_expected=args.coordinators_expected,
        response_cache=response_cache_config(args),
        scheduling=scheduling(args),
        resilience=resilience(args),
        api_keys=keys,
        drain_s=args.drain_timeout,
        http_fd=args.http_fd,
        leader_lock=args.leader_lock,
        leader_lease=args.leader_lease,
        lease_duration_s=args.lease_duration,
        lease_renew_deadline_s=args.lease_duration * 2 / 3,
        kube_api=args.kube_api,
        fleetmodels_namespace=args.fleetmodels,
        node_scale=node_scale_config(args),
        curve_keys=server_keys(args),
        **({"coordinator_id": args.coordinator_id} if args.coordinator_id else {}),
    )
    files = tokenizer_files(args)
    if args.hot_restart:
        return _hot_restart(args)
    coordinator = Coordinator(cfg, tokenizer_files=files)
    with _tracing(args):
        heap.freeze()
        return trio.run(_serve_until_signal, coordinator.run, coordinator.drain, args.parent_fd)


def _hot_restart(args: argparse.Namespace) -> int:
    import trio

    from fleet.coordinator.hotrestart import HotRestart, listen

    try:
        listener = listen(args.host, args.port)
    except OSError as exc:
        raise FleetError(f"cannot listen on {args.host}:{args.port}: {exc}") from exc
    logging.getLogger("fleet").info(
        "hot restart: listening on %s:%d; SIGHUP restarts the coordinator gracefully",
        args.host,
        listener.getsockname()[1],
    )
    argv = [a for a in sys.argv[1:] if a != "--hot-restart"]

    def child(http_fd: int, parent_fd: int) -> list[str]:
        return [sys.executable, "-m", "fleet", *argv, f"--http-fd={http_fd}",
                f"--parent-fd={parent_fd}"]  # fmt: skip

    return trio.run(HotRestart(child, listener).run)


def cmd_agent(args: argparse.Namespace) -> int:
    import trio

    from fleet.agent.discovery import DiscoveryConfig, ServiceAddress
    from fleet.agent.launcher import LaunchConfig
    from fleet.agent.service import Agent, AgentConfig
    from fleet.agent.supervisor import SupervisorConfig

    _setup_logging(args.log_dir, verbose_stderr=True, log_format=args.log_format)
    kwargs: dict[str, Any] = {}
    if args.node_id:
        kwargs["node_id"] = args.node_id
    discovery = None
    if args.coordinator_service is not None:
        discovery = DiscoveryConfig(
            ServiceAddress.parse(args.coordinator_service),
            interval_s=args.coordinator_resolve_interval,
        )
    cfg = AgentConfig(
        coordinator_endpoint="" if discovery else args.coordinator or "tcp://127.0.0.1:5555",
        discovery=discovery,
        http_host=args.http_host,
        http_port=args.http_port,
        log_dir=args.log_dir,
        launch=LaunchConfig(host=args.engine_host),
        supervisor=SupervisorConfig(startup_timeout_s=args.engine_startup_timeout),
        fake_gpus=fake_gpus(args),
        store=store_config(args),
        curve_keys=client_keys(args),
        **kwargs,
    )
    agent = Agent(cfg)
    heap.freeze()
    return trio.run(_serve_until_signal, agent.run)  # an agent stops at once


async def _serve_until_signal(
    service_run: Any, drain: Any = None, parent_fd: int | None = None
) -> int:
    """Run a service until SIGINT or SIGTERM. With ``drain``, the first signal drains it (it
    returns by itself once drained) and a second one stops it at once; ``parent_fd`` (a hot
    restart's child) also drains it when its parent is gone."""
    import trio

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signals() -> None:
                draining = False
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if drain is None or draining:
                        logging.getLogger("fleet").warning("%s: stopping", name)
                        nursery.cancel_scope.cancel()
                        return
                    logging.getLogger("fleet").warning("%s: draining", name)
                    draining = True
                    drain()

            async def run(*, task_status: Any) -> None:
                await service_run(task_status=task_status)
                nursery.cancel_scope.cancel()  # it returned by itself (drained)

            nursery.start_soon(stop_on_signals)
            await nursery.start(run)
            if parent_fd is not None:
                from fleet.coordinator.hotrestart import watch_parent

                nursery.start_soon(watch_parent, parent_fd, drain)
    return 0


@contextlib.contextmanager
def _tracing(args: argparse.Namespace) -> Iterator[None]:
    """Tracing on while inside when ``--otel-endpoint`` (or the OTLP variable) says so; the
    spans left are flushed on the way out."""
    from fleet.coordinator import tracing

    provider = tracing.configure(args.otel_endpoint)
    try:
        yield
    finally:
        if provider is not None:
            tracing.install(None)
            provider.shutdown()


def _setup_logging(log_dir: Path | None, *, verbose_stderr: bool, log_format: str) -> None:
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    fmt = logjson.formatter(log_format)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(logging.INFO if verbose_stderr else logging.WARNING)
    stderr.setFormatter(fmt)
    stderr.addFilter(logjson.RequestContext())
    root.addHandler(stderr)
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_dir / "fleet.log")
        handler.setFormatter(fmt)
        handler.addFilter(logjson.RequestContext())
        root.addHandler(handler)
    for noisy in ("httpx", "httpcore", "hypercorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


__all__ = ["cmd_agent", "cmd_coordinator", "cmd_up", "shared_flags"]
