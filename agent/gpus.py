"""GPU discovery and health through NVML.

Three layers, thinnest last:

* :class:`~.nvml.NvmlReader` (:mod:`.nvml`) wraps an ``pynvml``-shaped module. Its methods
  block, so the service calls them through ``trio.to_thread.run_sync``; it owns the NVML
  session and the XID event set. :func:`~.nvml.discover` is a one-shot read for the CLI.
* :class:`~.gpuhealth.GpuHealth` (:mod:`.gpuhealth`) is the sans-I/O health policy: it takes
  :class:`~.gpuhealth.GpuEvent` values and merges them into readings (XIDs as NVIDIA's
  k8s-device-plugin treats them).
* :class:`GpuMonitor`, here, is the trio service.

The names of the other two modules are importable from here too.

Without NVML (``pynvml`` not importable, no ``libnvidia-ml``, driver not loaded) discovery
returns no GPUs and the agent runs CPU engines only; nothing here raises for that.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import trio

from fleet.protocol.errors import ConfigError
from fleet.protocol.messages import GpuInfo

from .gpuhealth import DEFAULT_APPLICATION_XIDS, GpuEvent, GpuHealth
from .nvml import NvmlReader, NvmlUnavailableError, discover, load_nvml, say_cpu_only

__all__ = [
    "DEFAULT_APPLICATION_XIDS",
    "NVML_EVENTS_LIMITER",
    "NVML_LIMITER",
    "GpuConfig",
    "GpuEvent",
    "GpuHealth",
    "GpuMonitor",
    "NvmlReader",
    "NvmlUnavailableError",
    "discover",
    "load_nvml",
]

log = logging.getLogger(__name__)

#: Every NVML query and the session's init/shutdown go through this one token.
NVML_LIMITER = trio.CapacityLimiter(1)
#: The XID watcher's blocking event wait has its own token, so it never holds up readings
#: (NVML is thread-safe; the wait can last ``xid_wait_ms``).
NVML_EVENTS_LIMITER = trio.CapacityLimiter(1)


@dataclass(frozen=True)
class GpuConfig:
    """GPU monitoring settings.

    Args:
        refresh_s: seconds between readings.
        xid_wait_ms: longest single blocking event wait; bounds how long a stop takes.
        application_xids: XIDs recorded without marking the GPU unhealthy.
        grace_s: longest wait for NVML cleanup (event set free, ``nvmlShutdown``) on stop.

    Raises:
        ConfigError: a value is out of range (names the key and value).
    """

    refresh_s: float = 5.0
    xid_wait_ms: int = 500
    application_xids: frozenset[int] = DEFAULT_APPLICATION_XIDS
    grace_s: float = 2.0

    def __post_init__(self) -> None:
        if not (self.refresh_s > 0 and math.isfinite(self.refresh_s)):
            raise ConfigError("refresh_s", self.refresh_s, "must be a finite number > 0")
        if not 1 <= self.xid_wait_ms <= 60_000:
            raise ConfigError("xid_wait_ms", self.xid_wait_ms, "must be within 1..60000")
        if not (self.grace_s >= 0 and math.isfinite(self.grace_s)):
            raise ConfigError("grace_s", self.grace_s, "must be a finite number >= 0")


class GpuMonitor:
    """Keeps GPU readings and XID health current.

    Owns: the NVML session (init to shutdown), the XID event set, and two tasks in its own
    nursery: the refresh loop (a read every ``refresh_s``) and the XID watcher, which waits for
    events in a worker thread, ``xid_wait_ms`` at a time, and checks for cancellation between
    waits. ``run()`` calls ``task_status.started()`` after the first reading (at once, with no
    GPUs, when NVML is unavailable).

    Stopping is cancellation: the watcher's current wait ends within ``xid_wait_ms`` (threads
    are never abandoned mid-call), then the event set is freed and ``nvmlShutdown`` called in a
    shielded scope bounded by ``grace_s``.

    Args:
        config: settings; None uses the defaults.
        nvml_module: a ``pynvml``-shaped module; None imports ``pynvml`` when ``run()`` starts.
    """

    def __init__(self, config: GpuConfig | None = None, *, nvml_module: Any | None = None) -> None:
        self._config = config if config is not None else GpuConfig()
        self._nvml = nvml_module
        self._health = GpuHealth(self._config.application_xids)
        self._readings: tuple[GpuInfo, ...] = ()
        self._available = False
        self._read_failing = False
        self._updated = trio.Event()

    @property
    def available(self) -> bool:
        """Whether NVML started; False means CPU engines only."""
        return self._available

    async def updated(self) -> None:
        """Wait for the next change to :meth:`snapshot`: a new reading or a health event."""
        await self._updated.wait()

    def _bump(self) -> None:
        self._updated.set()
        self._updated = trio.Event()

    def snapshot(self) -> tuple[GpuInfo, ...]:
        """Return the latest readings merged with XID health (``()`` without NVML)."""
        return self._health.apply(self._readings)

    def xid_counts(self) -> dict[tuple[int, int], int]:
        """XID events recorded since start, by (GPU index, XID); an event NVML gave for no
        particular GPU counts for each."""
        out: dict[tuple[int, int], int] = {}
        for gpu in self._readings:
            for (uuid, xid), n in self._health.xid_counts.items():
                if uuid is None or uuid == gpu.uuid:
                    out[(gpu.index, xid)] = out.get((gpu.index, xid), 0) + n
        return out

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; see the class docstring for what starts and how it stops.

        Args:
            task_status: ``started()`` once readings (or the lack of NVML) are known.

        Raises:
            Cancelled: only by cancellation; NVML failures are logged, never raised.
        """
        nvml = self._nvml if self._nvml is not None else load_nvml()
        if nvml is None:
            say_cpu_only("pynvml is not installed")
            task_status.started()
            await trio.sleep_forever()
        reader = NvmlReader(nvml)
        try:
            await trio.to_thread.run_sync(reader.open, limiter=NVML_LIMITER)
        except NvmlUnavailableError as exc:
            say_cpu_only(str(exc))
            task_status.started()
            await trio.sleep_forever()
        self._available = True
        try:
            await self._refresh(reader)
            try:
                watch = await trio.to_thread.run_sync(reader.open_events, limiter=NVML_LIMITER)
            except reader.nvml_error as exc:
                log.warning("registering NVML events failed (%s): no XID health checks", exc)
                watch = False
            log.info("NVML started: %d GPU(s)", len(self._readings))
            task_status.started()
            async with trio.open_nursery() as nursery:
                if watch:
                    nursery.start_soon(self._watch_xids, reader)
                while True:
                    await trio.sleep(self._config.refresh_s)
                    await self._refresh(reader)
        finally:
            self._available = False
            with trio.move_on_after(self._config.grace_s, shield=True) as cleanup:
                await trio.to_thread.run_sync(
                    reader.close, limiter=NVML_LIMITER, abandon_on_cancel=True
                )
            if cleanup.cancelled_caught:
                log.warning("NVML shutdown took over %.1f s; gave up on it", self._config.grace_s)

    async def _refresh(self, reader: NvmlReader) -> None:
        try:
            self._readings = await trio.to_thread.run_sync(reader.read, limiter=NVML_LIMITER)
        except reader.nvml_error as exc:
            if not self._read_failing:
                log.warning("reading GPUs failed (%s); keeping the last readings", exc)
            self._read_failing = True
            return
        self._read_failing = False
        self._bump()

    async def _watch_xids(self, reader: NvmlReader) -> None:
        pause_s = self._config.xid_wait_ms / 1000
        while True:
            event = await trio.to_thread.run_sync(
                reader.wait_event,
                self._config.xid_wait_ms,
                limiter=NVML_EVENTS_LIMITER,
                abandon_on_cancel=False,
            )
            if event is None:
                continue
            self._health.record(event)
            self._bump()
            if event.kind == "wait_failed":
                await trio.sleep(pause_s)  # a broken event set fails at once: do not spin
