"""``fleet up``: a coordinator and one local agent in one process, for a single machine.

Both services run in one trio nursery; the agent's engines are child processes it owns. SIGINT
or SIGTERM cancels the nursery: engines get SIGTERM and their grace period, then SIGKILL, and
the process exits once they are gone. While engines load, a status line says what is happening
and, on a terminal, progress bars show the engines ready and each model download.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from typing import Any

import trio

from fleet.agent.launcher import LaunchConfig
from fleet.agent.service import Agent, AgentConfig
from fleet.agent.supervisor import SupervisorConfig
from fleet.cliprogress import Tracker
from fleet.coordinator.apikeys import ApiKeys
from fleet.coordinator.resilience import ResilienceConfig
from fleet.coordinator.router.scheduler import SchedulingConfig
from fleet.coordinator.service import Coordinator, CoordinatorAddresses, CoordinatorConfig

STATUS_EVERY_S = 5.0


def say(text: str) -> None:
    print(text, flush=True)


async def run_up(
    args: argparse.Namespace,
    declared: dict[str, Any],
    scheduling: SchedulingConfig | None = None,
    resilience: ResilienceConfig | None = None,
    api_keys: ApiKeys | None = None,
) -> int:
    """Run coordinator + agent until SIGINT/SIGTERM; return the exit code."""
    coord = Coordinator(
        CoordinatorConfig(
            host=args.host,
            port=args.port,
            agent_endpoint="tcp://127.0.0.1:*",
            **declared,
            max_body_bytes=args.max_body_bytes,
            kv_index_max_entries=args.kv_index_max_entries,
            slots_per_engine=args.engine_slots,
            max_queue=args.max_queue,
            max_queue_wait_s=args.max_queue_wait,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            redis_url=args.redis_url,
            response_cache=args.response_cache_cfg,  # parsed by the CLI
            scheduling=scheduling,
            resilience=resilience or ResilienceConfig(),
            api_keys=api_keys or ApiKeys(),
            placement_settle_s=0.0,  # the only node is this process's own agent
            curve_keys=args.curve[0] if args.curve else None,  # parsed by the CLI
        ),
        tokenizer_files=args.tokenizer_files,  # parsed by the CLI: a SubsetFetcher
    )
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, signals, nursery.cancel_scope)
            addrs: CoordinatorAddresses = await nursery.start(coord.run)
            say(f"• coordinator listening on {addrs.http_url}")
            agent = Agent(
                AgentConfig(
                    node_id="local",
                    coordinator_endpoint=addrs.agent_endpoint,
                    http_port=args.agent_port,
                    log_dir=args.log_dir,
                    launch=LaunchConfig(),
                    supervisor=SupervisorConfig(startup_timeout_s=args.engine_startup_timeout),
                    fake_gpus=args.fake_gpus,  # parsed by the CLI: a tuple of FakeGpuSpec
                    store=args.store,  # parsed by the CLI: a StoreConfig
                    curve_keys=args.curve[1] if args.curve else None,
                )
            )
            agent_url = await nursery.start(agent.run)
            say(f"• agent 'local' up ({agent_url}); engine logs in {args.log_dir}/")
            nursery.start_soon(_report_progress, coord, addrs)
    say("• stopped: every engine process has exited")
    return 0


async def _stop_on_signal(signals: Any, scope: trio.CancelScope) -> None:
    async for signum in signals:
        say(f"\n• {signal.Signals(signum).name}: stopping engines (SIGTERM, then SIGKILL)")
        scope.cancel()
        return


async def _report_progress(coord: Coordinator, addrs: CoordinatorAddresses) -> None:
    """Print engine state changes and a waiting line until a model is served, then the URL
    and examples once for each served name as it gets its first ready engine."""
    seen: dict[str, tuple[str, int]] = {}
    started = time.monotonic()
    last_line = 0.0
    announced: set[str] = set()
    with contextlib.ExitStack() as stack:
        bars = stack.enter_context(Tracker()) if sys.stdout.isatty() else None
        while True:
            if bars is not None and _show_bars(coord, bars):
                stack.close()  # every engine is ready: the bars stay as they are
                bars = None
            for engine in coord.registry.engines():
                key = (engine.state, engine.pid)
                if engine.state == "starting" and not engine.pid:
                    continue  # assigned, process not spawned yet: the next line says more
                if seen.get(engine.id) != key:
                    seen[engine.id] = key
                    elapsed = time.monotonic() - started
                    detail = f"pid {engine.pid}" if engine.pid else ""
                    if engine.state == "starting":
                        detail += ", loading the model, waiting for /health"
                    say(
                        f"• [{elapsed:5.1f} s] engine {engine.id}: {engine.state}"
                        + (f" ({detail.strip(', ')})" if detail else "")
                    )
            served = coord.served_models()
            for model in served:
                if model not in announced:
                    say(banner(addrs.http_url, model))
            announced = set(served)
            if not served:
                now = time.monotonic()
                if now - last_line >= STATUS_EVERY_S:
                    last_line = now
                    states = ", ".join(f"{k}={v[0]}" for k, v in sorted(seen.items())) or "placing"
                    fetching = "".join(f"; {line}" for line in _fetching(coord))
                    say(f"• [{now - started:5.1f} s] waiting for engines: {states}{fetching}")
            with trio.move_on_after(STATUS_EVERY_S):  # a waiting line at least this often
                await coord.changed()


def _show_bars(coord: Coordinator, bars: Tracker) -> bool:
    """Move the bars of ``fleet up`` on a terminal: engines ready of those declared, and
    each model download; True once every declared engine is ready."""
    desired = sum(d.replicas for d in coord.placer.deployments)
    ready = sum(e.state == "ready" for e in coord.registry.engines())
    bars.update("engines", f"engines ready {ready}/{desired}", ready, desired or 1)
    for node in coord.registry.live_nodes():
        for f in node.fetches:
            if f.state != "failed":
                bars.update(f"{node.node_id} {f.uri}", f"{node.node_id}: fetching {f.uri}",
                            f.bytes_done, f.bytes_total or None)  # fmt: skip
    return bool(desired) and ready >= desired


def _fetching(coord: Coordinator) -> list[str]:
    """What starting engines wait for, when it is their model's download (the agent's
    ``fetching URI: 1.2/4.0 GiB, 50.0 MiB/s, ETA 56 s``), once per source."""
    lines: dict[str, None] = {}
    for node in coord.registry.live_nodes():
        for status in node.engines.values():
            if status.state == "starting" and status.last_error.startswith("fetching "):
                lines[f"{node.node_id}: {status.last_error}"] = None
    return list(lines)


def banner(url: str, model: str) -> str:
    return f"""
✔ Fleet is serving `{model}` at {url}/v1   (Ctrl-C to stop)

  curl {url}/v1/completions -H 'content-type: application/json' \\
    -d '{{"model": "{model}", "prompt": "Hello, fleet", "max_tokens": 16}}'

  {sys.executable} -c 'from openai import OpenAI; \\
c = OpenAI(base_url="{url}/v1", api_key="none"); \\
print(c.chat.completions.create(model="{model}", max_tokens=16, \\
messages=[{{"role": "user", "content": "Hi"}}]).choices[0].message.content)'

  {sys.executable} -m fleet engines     # what runs where
"""


__all__ = ["STATUS_EVERY_S", "banner", "run_up", "say"]
