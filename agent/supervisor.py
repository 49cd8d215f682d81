"""Supervise one engine process: start it, wait for health, watch it, restart it, stop it.

An engine counts as crashed when its process exits for any reason Fleet did not ask for (vLLM
can exit with status 0 after its engine core dies), or when its API stops answering ``/health``
for ``unhealthy_after`` probes in a row (vLLM's API process can outlive a dead core). A crashed
engine is killed, whole process group, and started again after an exponential backoff; the
backoff starts over once an engine has stayed ready for ``stable_s``.

An engine whose ``model_path`` is a URI (``hf://``, ``s3://``, ``http(s)://``, ``file://``) is
fetched through the agent's model store first: the engine stays ``starting`` meanwhile, its
``last_error`` showing the download's progress or, after a failure, the reason and when the
store tries again (its retry policy). The engine pins its model for as long as it runs.

Stopping is cancellation: the process group gets SIGTERM, ``grace_s`` to exit, then SIGKILL.
The engine is also started with ``PR_SET_PDEATHSIG`` so it dies with the agent even when the
agent is killed outright.

A rank of a tensor-parallel group spread over nodes (``spec.is_rank``) is not restarted: a rank
started alone cannot join the group the others formed, and rank 0 outlives a dead peer while
answering 503. A crashed rank is reaped and reported ``failed``, and the coordinator tears the
whole group down. Rank 0 picks the group's master port when the spec leaves it 0 (reported in
its status); ranks above 0 have no API, so they count as ready while their process runs.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import signal
import subprocess
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Protocol

import httpx
import trio

from fleet.protocol.errors import ConfigError
from fleet.protocol.messages import EngineSpec, EngineStatus

from .launcher import LaunchConfig, engine_command, engine_env, free_port
from .process import ChildProcess, spawn
from .reaper import Reaper
from .store import FetchProgress, RetryPolicy, StoreError

log = logging.getLogger(__name__)


class ModelFetcher(Protocol):
    """What the supervisor needs of the model store (:class:`~fleet.agent.store.ModelStore`)."""

    @property
    def retry(self) -> RetryPolicy: ...

    async def fetch(self, uri: str, *, holder: str = "") -> Path: ...

    def unpin(self, uri: str, holder: str) -> None: ...

    def progress(self) -> tuple[FetchProgress, ...]: ...


def is_model_uri(model_path: str) -> bool:
    """Whether ``model_path`` names a source for the model store rather than a local path."""
    return "://" in model_path


@dataclass(frozen=True)
class SupervisorConfig:
    """Timings of engine supervision (seconds)."""

    startup_timeout_s: float = 600.0
    health_interval_s: float = 2.0
    startup_poll_s: float = 0.5
    health_timeout_s: float = 5.0
    unhealthy_after: int = 3
    backoff_base_s: float = 1.0
    backoff_factor: float = 2.0
    backoff_max_s: float = 60.0
    stable_s: float = 60.0
    grace_s: float = 10.0

    def __post_init__(self) -> None:
        for key in (
            "startup_timeout_s",
            "health_interval_s",
            "startup_poll_s",
            "health_timeout_s",
            "backoff_base_s",
            "backoff_max_s",
        ):
            if not getattr(self, key) > 0:
                raise ConfigError(key, getattr(self, key), "must be > 0")
        if self.backoff_factor < 1:
            raise ConfigError("backoff_factor", self.backoff_factor, "must be >= 1")
        if self.unhealthy_after < 1:
            raise ConfigError("unhealthy_after", self.unhealthy_after, "must be >= 1")
        if self.grace_s < 0 or self.stable_s < 0:
            raise ConfigError("grace_s", self.grace_s, "must be >= 0")

    def backoff(self, attempt: int) -> float:
        """Delay before restart number ``attempt`` (0-based)."""
        return float(min(self.backoff_max_s, self.backoff_base_s * self.backoff_factor**attempt))


class EngineSupervisor:
    """Owns one engine's processes for as long as :meth:`run` runs.

    Args:
        spec: the engine to run.
        launch: how engines are started on this node.
        cfg: supervision timings.
        kv_endpoint: where the engine publishes KV events (bound by the agent's relay).
        replay_host: the loopback address the engine binds its KV replay socket on.
        client: an httpx client for health probes.
        gpu_uuids: NVML index → UUID of this node's GPUs.
        log_dir: where the engine's stdout/stderr go (one file per engine), or None to discard.
        on_change: called after every state change.
        replay_host: the address the engine's KV replay socket binds.
        reaper: told about each engine process group, to kill it if the agent dies.
        store: fetches a ``model_path`` that is a URI (None: such an engine fails).
    """

    def __init__(
        self,
        spec: EngineSpec,
        *,
        launch: LaunchConfig,
        cfg: SupervisorConfig,
        kv_endpoint: str,
        client: httpx.AsyncClient,
        gpu_uuids: Mapping[int, str] | None = None,
        log_dir: Path | None = None,
        on_change: Callable[[EngineSupervisor], None] | None = None,
        replay_host: str = "127.0.0.1",
        reaper: Reaper | None = None,
        store: ModelFetcher | None = None,
    ) -> None:
        if spec.is_rank and spec.node_rank == 0 and not spec.master_port:
            # The group's rendezvous: rank 0's agent knows which of its ports are free.
            spec = dataclasses.replace(
                spec, master_addr=launch.host, master_port=free_port(launch.host)
            )
        self.spec = spec
        self.store = store
        self.model_dir = "" if is_model_uri(spec.model_path) else spec.model_path
        self.launch = launch
        self.cfg = cfg
        self.kv_endpoint = kv_endpoint
        self.client = client
        self.gpu_uuids = dict(gpu_uuids or {})
        self.log_dir = log_dir
        self.on_change = on_change
        self.reaper = reaper
        self.port = 0
        self.url = ""
        self._new_http_port()
        # The engine binds its replay ROUTER here. A port picked free may be taken by the time
        # the engine binds it (64 engines start at once): each restart picks a new one, and the
        # agent hands the relay the current endpoint on every state change.
        self._replay_host = replay_host
        self.replay_endpoint = self._new_replay_endpoint()
        self.state = "starting"
        self.pid = 0
        self.restarts = 0
        self.last_error = ""
        self.kv_events = 0
        self.ready_since: float | None = None
        self._changed = trio.Event()

    def status(self) -> EngineStatus:
        """The engine as reported to the coordinator."""
        return EngineStatus(
            engine_id=self.spec.engine_id,
            model=self.spec.model,
            url=self.url,
            state=self.state,
            role=self.spec.role,
            kind=self.spec.kind,
            pid=self.pid,
            restarts=self.restarts,
            gpus=self.spec.gpus,
            block_size=self.spec.block_size,
            kv_events=self.kv_events,
            last_error=self.last_error,
            group=self.spec.group,
            node_rank=self.spec.node_rank,
            nnodes=self.spec.nnodes,
            master_addr=self.spec.master_addr,
            master_port=self.spec.master_port,
        )

    def _set(self, state: str, error: str = "") -> None:
        if error:
            self.last_error = error
        if state != self.state:
            log.info("engine %s: %s%s", self.spec.engine_id, state, f" ({error})" if error else "")
        self.state = state
        self._changed.set()
        self._changed = trio.Event()
        if self.on_change is not None:
            self.on_change(self)

    async def changed(self) -> None:
        """Wait for the next state change."""
        await self._changed.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the engine running until cancelled; ``started()`` once the first launch began
        (after its model was fetched, for a URI)."""
        attempt = 0
        first = True
        pinned = False
        try:
            if not self.model_dir:
                pinned = True
                await self._fetch_model()
            while True:
                reason = await self._run_once(task_status if first else None)
                first = False
                if self.spec.is_rank:  # its group is broken: the coordinator restarts it whole
                    self._set("failed", f"{reason}; a tensor-parallel rank is not restarted")
                    await trio.sleep_forever()
                if self.ready_since is not None and trio.current_time() - self.ready_since >= (
                    self.cfg.stable_s
                ):
                    attempt = 0
                self.ready_since = None
                delay = self.cfg.backoff(attempt)
                attempt += 1
                self.restarts += 1
                self._set("backoff", f"{reason}; restart {self.restarts} in {delay:.1f} s")
                await trio.sleep(delay)
        finally:
            if pinned and self.store is not None:
                self.store.unpin(self.spec.model_path, self.spec.engine_id)
            self.pid = 0
            self._set("stopped")

    async def _fetch_model(self) -> None:
        """Fetch the model through the store, retrying with its backoff; sets ``model_dir``."""
        uri = self.spec.model_path
        if self.store is None:
            self._set("failed", f"model_path {uri} is a URI and this agent has no model store")
            await trio.sleep_forever()
        store = self.store
        assert store is not None
        failures = 0
        rng = random.Random()
        while True:
            self._set("starting", f"fetching {uri}")
            error: StoreError | None = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._report_fetch, store, uri)
                try:
                    path = await store.fetch(uri, holder=self.spec.engine_id)
                except StoreError as exc:
                    error = exc
                nursery.cancel_scope.cancel()
            if error is not None:
                failures += 1
                delay = store.retry.delay_s(failures, rng)
                self._set(
                    "starting",
                    f"model fetch failed ({error.kind}): {error.reason}; "
                    f"retry {failures} in {delay:.0f} s",
                )
                await trio.sleep(delay)
                continue
            self.model_dir = str(path)
            self.last_error = ""
            return

    async def _report_fetch(self, store: ModelFetcher, uri: str) -> None:
        """Put the download's progress in ``last_error`` every ``health_interval_s``."""
        while True:
            await trio.sleep(self.cfg.health_interval_s)
            for p in store.progress():
                if p.uri == uri and p.state != "failed":
                    self._set("starting", p.describe())

    def _new_http_port(self) -> None:
        host = self.launch.host
        self.port = free_port(host)
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def _new_replay_endpoint(self) -> str:
        host = self._replay_host
        return f"tcp://{f'[{host}]' if ':' in host else host}:{free_port(host)}"

    async def _run_once(self, task_status: trio.TaskStatus[None] | None) -> str:
        """Run the engine once; return why it crashed (cancellation stops it instead)."""
        if self.restarts:
            # Ports picked free may have been taken meanwhile (64 engines start at once, each
            # binding an HTTP port and ZMQ sockets): a restart binds fresh ones. The engine's
            # new URL reaches the coordinator with the next heartbeat.
            self._new_http_port()
            self.replay_endpoint = self._new_replay_endpoint()
        argv = engine_command(
            replace(self.spec, model_path=self.model_dir),
            self.launch,
            port=self.port,
            kv_endpoint=self.kv_endpoint,
            replay_endpoint=self.replay_endpoint,
        )
        env = engine_env(self.spec, self.launch, gpu_uuids=self.gpu_uuids)
        self._set("starting")
        logfile = self._open_log()
        try:
            proc = spawn(
                argv, env=env, stdout=logfile if logfile is not None else subprocess.DEVNULL
            )
        except OSError as exc:
            return f"cannot start {argv[0]}: {exc}"
        finally:
            if logfile is not None:
                logfile.close()
        self.pid = proc.pid
        if self.reaper is not None:
            self.reaper.watch(proc.pid)
        log.info("engine %s: started pid %d: %s", self.spec.engine_id, proc.pid, " ".join(argv))
        if task_status is not None:
            task_status.started()
        reasons: list[str] = []
        try:
            async with trio.open_nursery() as nursery:

                async def watch(check: Callable[[ChildProcess], Awaitable[str]]) -> None:
                    reasons.append(await check(proc))
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch, self._watch_exit)
                nursery.start_soon(watch, self._watch_health)
        finally:
            with trio.CancelScope(shield=True):
                # Out of routing before the group is reaped: after a crash that takes up to
                # grace_s (vLLM's engine core outlives its API server), and the coordinator
                # must not send requests to an engine that is gone meanwhile.
                self._set("stopping", reasons[0] if reasons else "")
                await self._terminate(proc)
        return reasons[0]

    def _open_log(self) -> IO[bytes] | None:
        if self.log_dir is None:
            return None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return open(self.log_dir / f"{self.spec.engine_id}.log", "ab")  # noqa: SIM115

    async def _watch_exit(self, proc: ChildProcess) -> str:
        code = await proc.wait()
        return f"process exited with status {code}"

    async def _watch_health(self, proc: ChildProcess) -> str:
        if self.spec.is_rank and self.spec.node_rank > 0:  # headless: no API to probe
            self.ready_since = trio.current_time()
            self._set("ready")
            await trio.sleep_forever()
        deadline = trio.current_time() + self.cfg.startup_timeout_s
        while not await self._healthy():
            if trio.current_time() > deadline:
                return f"not healthy within {self.cfg.startup_timeout_s:.0f} s"
            await trio.sleep(self.cfg.startup_poll_s)
        self.ready_since = trio.current_time()
        self._set("ready")
        failures = 0
        while True:
            await trio.sleep(self.cfg.health_interval_s)
            if await self._healthy():
                if failures:
                    self._set("ready")
                failures = 0
                continue
            failures += 1
            self._set("unhealthy", f"/health failed {failures} time(s)")
            if failures >= self.cfg.unhealthy_after:
                return f"/health failed {failures} times in a row"

    async def _healthy(self) -> bool:
        try:
            response = await self.client.get(
                self.url + "/health", timeout=self.cfg.health_timeout_s
            )
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def _terminate(self, proc: ChildProcess) -> None:
        """SIGTERM the process group, wait ``grace_s``, then SIGKILL it; reap."""
        try:
            if proc.returncode is None:
                proc.killpg(signal.SIGTERM)
                with trio.move_on_after(self.cfg.grace_s):
                    await proc.wait()
            # The group may outlive its leader (vLLM's engine core is a child): kill what is left.
            proc.killpg(signal.SIGKILL)
            await proc.wait()
            left = await proc.wait_group_gone(timeout_s=5.0)
            if left:
                log.error("engine %s: processes %s survived SIGKILL", self.spec.engine_id, left)
        finally:
            proc.close()
            if self.reaper is not None:
                self.reaper.forget(proc.pid)
            self.pid = 0


__all__ = ["EngineSupervisor", "SupervisorConfig"]
