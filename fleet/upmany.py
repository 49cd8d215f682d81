"""``fleet up --coordinators N``: N coordinator processes behind one HTTP port, one local agent.

This process binds the HTTP port once and hands the listening socket to N ``fleet coordinator``
children (``--http-fd``), which all accept from it: clients see one port, and a child that dies
takes only the connections it was serving (a socket per child with SO_REUSEPORT would also lose
the connections queued in the dead child's accept queue). Each child keeps its own agent
endpoint; the agent, run here, connects to all of them and tells each everything. The children
share a lock file: its holder leads (places engines; coordinator/leadership.py). A child that
dies is started again (coordinator/hotrestart.py's supervision, one per child); the agent's
engines keep running throughout. SIGINT or SIGTERM drains the children and stops the engines.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import trio

from fleet.agent.launcher import LaunchConfig
from fleet.agent.service import Agent, AgentConfig
from fleet.agent.supervisor import SupervisorConfig
from fleet.coordinator.hotrestart import HotRestart, listen
from fleet.protocol.curve import SERVER
from fleet.up import STATUS_EVERY_S, banner, say


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def child_argv(
    flags: Sequence[str],
    *,
    index: int,
    endpoint: str,
    lock: Path,
    log_dir: Path,
    count: int = 1,
    curve_keys: str | None = None,
) -> Callable[[int, int], list[str]]:
    """The command line of coordinator ``index`` of ``count``, given the HTTP and control
    descriptors; ``curve_keys``: ``fleet up --curve-keys DIR`` (the child gets DIR/coordinator)."""
    curve = [f"--curve-keys={Path(curve_keys) / SERVER}"] if curve_keys else []

    def argv(http_fd: int, parent_fd: int) -> list[str]:
        return [
            sys.executable, "-m", "fleet", "coordinator", *flags, *curve,
            f"--agent-endpoint={endpoint}", f"--leader-lock={lock}",
            f"--coordinator-id=coord-{index}", f"--log-dir={log_dir / f'coord-{index}'}",
            f"--coordinators-expected={count}",
            f"--http-fd={http_fd}", f"--parent-fd={parent_fd}",
        ]  # fmt: skip

    return argv


async def run_up_many(args: argparse.Namespace, flags: Sequence[str], count: int) -> int:
    """Run ``count`` coordinators (``flags``: their shared command-line options) and the local
    agent until SIGINT/SIGTERM; the exit status."""
    listener = listen(args.host, args.port)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
    url = f"http://{host}:{listener.getsockname()[1]}"
    log_dir = Path(args.log_dir)
    await trio.Path(log_dir).mkdir(parents=True, exist_ok=True)
    lock = log_dir / "leader.lock"
    endpoints = [f"tcp://127.0.0.1:{free_tcp_port()}" for _ in range(count)]
    supervisors = [
        HotRestart(
            child_argv(
                flags,
                index=i,
                endpoint=e,
                lock=lock,
                log_dir=log_dir,
                count=count,
                curve_keys=args.curve_keys,
            ),
            listener,
        )
        for i, e in enumerate(endpoints)
    ]
    status = 0
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            agent_scope = trio.CancelScope()

            def stop() -> None:
                for sup in supervisors:
                    sup.stop()
                agent_scope.cancel()

            async def supervise(sup: HotRestart, *, task_status: Any) -> None:
                nonlocal status
                code = await sup.supervise(task_status=task_status)
                if code and not status:  # a coordinator could not start (a bad flag, ...)
                    status = code
                    say(f"• a coordinator exited with status {code}: stopping")
                    stop()

            for sup in supervisors:
                await nursery.start(supervise, sup)
            say(f"• coordinator listening on {url} ({count} processes, leader lock {lock})")
            agent = Agent(
                AgentConfig(
                    node_id="local",
                    coordinator_endpoint=",".join(endpoints),
                    http_port=args.agent_port,
                    log_dir=log_dir,
                    launch=LaunchConfig(),
                    supervisor=SupervisorConfig(startup_timeout_s=args.engine_startup_timeout),
                    fake_gpus=args.fake_gpus,
                    store=args.store,
                    curve_keys=args.curve[1] if args.curve else None,
                )
            )

            async def run_agent(*, task_status: Any) -> None:
                with agent_scope:
                    await agent.run(task_status=task_status)

            agent_url = await nursery.start(run_agent)
            say(f"• agent 'local' up ({agent_url}); engine logs in {log_dir}/")
            progress = trio.CancelScope()

            async def report() -> None:
                with progress:
                    await _report_progress(url)

            nursery.start_soon(report)
            async for signum in signals:
                say(f"\n• {signal.Signals(signum).name}: draining the coordinators, stopping "
                     "engines (SIGTERM, then SIGKILL)")  # fmt: skip
                break
            progress.cancel()
            stop()
    listener.close()
    say("• stopped: every engine process has exited")
    return status


async def _report_progress(url: str) -> None:
    """Print engine state changes until a model is served, then the banner once per served
    name; asked through the shared port (any coordinator answers the same)."""
    seen: dict[str, str] = {}
    announced: set[str] = set()
    started = time.monotonic()
    last_line = 0.0
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        while True:
            try:
                engines = (await http.get("/api/v1/engines")).json()["engines"]
                models = (await http.get("/readyz")).json()["models"]  # /v1/models may need a key
            except (httpx.HTTPError, ValueError, KeyError):
                engines, models = [], []  # the coordinators are starting
            for engine in engines:
                if seen.get(engine["id"]) != engine["state"]:
                    seen[engine["id"]] = engine["state"]
                    elapsed = time.monotonic() - started
                    say(f"• [{elapsed:5.1f} s] engine {engine['id']}: {engine['state']}")
            for model in models:
                if model not in announced:
                    say(banner(url, model))
            announced = set(models)
            now = time.monotonic()
            if not models and now - last_line >= STATUS_EVERY_S:
                last_line = now
                states = ", ".join(f"{k}={v}" for k, v in sorted(seen.items())) or "placing"
                say(f"• [{now - started:5.1f} s] waiting for engines: {states}")
            await trio.sleep(1.0)


__all__ = ["child_argv", "free_tcp_port", "run_up_many"]
