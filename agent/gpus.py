"""GPU discovery and health through NVML.

Three layers, thinnest last:

* :class:`NvmlReader` wraps an ``pynvml``-shaped module. Its methods block, so the service calls
  them through ``trio.to_thread.run_sync``; it owns the NVML session and the XID event set.
* :class:`GpuHealth` is the sans-I/O health policy: it takes :class:`GpuEvent` values and merges
  them into readings. XID handling follows NVIDIA's k8s-device-plugin: application XIDs (13, 31,
  43, 45, 68, 109 by default) are recorded but leave the GPU healthy; any other XID, a double-bit
  ECC event or a failed event wait marks the GPU (or, without a known device, every GPU)
  unhealthy. Unhealthy is sticky until the agent restarts, as in the plugin.
* :class:`GpuMonitor` is the trio service; :func:`discover` is a one-shot read for the CLI.

Without NVML (``pynvml`` not importable, no ``libnvidia-ml``, driver not loaded) discovery
returns no GPUs and the agent runs CPU engines only; nothing here raises for that.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

import trio

from fleet.protocol.errors import ConfigError, FleetError
from fleet.protocol.messages import GpuInfo

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

#: XIDs NVIDIA's k8s-device-plugin treats as application errors (the GPU itself is fine).
DEFAULT_APPLICATION_XIDS: frozenset[int] = frozenset({13, 31, 43, 45, 68, 109})

_T = TypeVar("_T")
_MAX_XIDS = 64  # recent XIDs kept for reporting; health reasons are kept apart and never dropped


class NvmlUnavailableError(FleetError):
    """Raised by :meth:`NvmlReader.open` when NVML cannot start (library or driver missing).

    Callers treat it as "no GPUs on this node", not as a failure.
    """


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


@dataclass(frozen=True)
class GpuEvent:
    """One health event from NVML, already resolved to a GPU.

    ``uuid`` is None when the event concerns every GPU: it came without a device, from a device
    NVML could not name, or from one we did not register. ``kind`` is ``"xid"`` (with ``xid``),
    ``"ecc_double_bit"``, or ``"wait_failed"`` (with ``detail``).
    """

    uuid: str | None
    kind: Literal["xid", "ecc_double_bit", "wait_failed"]
    xid: int = 0
    detail: str = ""


class GpuHealth:
    """Sans-I/O XID health: records :class:`GpuEvent` values, merges them into readings.

    Args:
        application_xids: XIDs that are recorded but leave the GPU healthy.
    """

    def __init__(self, application_xids: frozenset[int] = DEFAULT_APPLICATION_XIDS) -> None:
        self.application_xids = application_xids
        self._xids: deque[tuple[str | None, int]] = deque(maxlen=_MAX_XIDS)
        self._reasons: dict[str | None, list[str]] = {}
        #: every XID event ever recorded, by (GPU uuid or None for all, XID): for metrics
        self.xid_counts: dict[tuple[str | None, int], int] = {}

    def record(self, event: GpuEvent) -> None:
        """Apply one event.

        Args:
            event: the event; ``uuid=None`` applies it to every GPU.
        """
        if event.kind == "xid":
            self._xids.append((event.uuid, event.xid))
            key = (event.uuid, event.xid)
            self.xid_counts[key] = self.xid_counts.get(key, 0) + 1
            if event.xid in self.application_xids:
                return
            reason = f"xid {event.xid}"
        elif event.kind == "ecc_double_bit":
            reason = "double-bit ecc error"
        else:
            reason = f"nvml event wait failed: {event.detail}"
        reasons = self._reasons.setdefault(event.uuid, [])
        if reason not in reasons:
            reasons.append(reason)
            log.warning("GPU %s marked unhealthy: %s", event.uuid or "(all)", reason)

    def apply(self, readings: Iterable[GpuInfo]) -> tuple[GpuInfo, ...]:
        """Merge recorded health into readings.

        Args:
            readings: GPUs as last read; a reading already unhealthy keeps its own reason first.

        Returns:
            The readings with ``xids``, ``healthy`` and ``reason`` filled in.
        """
        merged = []
        for gpu in readings:
            xids = tuple(x for uuid, x in self._xids if uuid is None or uuid == gpu.uuid)
            reasons = [gpu.reason] if gpu.reason else []
            reasons += self._reasons.get(None, []) + self._reasons.get(gpu.uuid, [])
            healthy = gpu.healthy and not (self._reasons.get(None) or self._reasons.get(gpu.uuid))
            merged.append(replace(gpu, xids=xids, healthy=healthy, reason="; ".join(reasons)))
        return tuple(merged)


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class NvmlReader:
    """Blocking NVML access; call every method from a worker thread, never the event loop.

    Readings that NVML cannot give (``NVMLError_NotSupported`` or any other ``NVMLError``)
    degrade to neutral values instead of failing the GPU: name ``""``, memory ``0``/``0``,
    utilization ``0.0``, temperature ``0.0``, power ``0.0``, ECC uncorrected ``0``. A GPU whose
    handle or UUID cannot be read, or that reports ``GPU is lost``, is returned unhealthy with
    the NVML error as its reason.

    Args:
        nvml: the ``pynvml`` module, or an object with the same functions, constants and errors.
    """

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self.nvml_error: type[Exception] = nvml.NVMLError
        self._event_set: Any = None
        self._event_uuids: frozenset[str] = frozenset()
        self._degraded: set[tuple[int, str]] = set()
        # A fake inventory (fleet.agent.fakenvml) says so; every reading is then marked fake.
        self.fake = bool(getattr(nvml, "FLEET_FAKE", False))

    def open(self) -> None:
        """Start the NVML session (``nvmlInit``).

        Raises:
            NvmlUnavailableError: NVML could not start (library missing, driver not loaded...).
        """
        try:
            self._nvml.nvmlInit()
        except self.nvml_error as exc:
            raise NvmlUnavailableError(str(exc)) from exc

    def close(self) -> None:
        """Free the event set, if any, and end the session (``nvmlShutdown``); never raises NVML
        errors (they are logged)."""
        if self._event_set is not None:
            event_set, self._event_set = self._event_set, None
            try:
                self._nvml.nvmlEventSetFree(event_set)
            except self.nvml_error as exc:
                log.warning("nvmlEventSetFree failed: %s", exc)
        try:
            self._nvml.nvmlShutdown()
        except self.nvml_error as exc:
            log.warning("nvmlShutdown failed: %s", exc)

    def read(self) -> tuple[GpuInfo, ...]:
        """Read every GPU once (health from readings only; XIDs are merged by :class:`GpuHealth`).

        Returns:
            One :class:`GpuInfo` per GPU, in NVML index order.

        Raises:
            NVMLError: the GPU count itself could not be read (the module's own error class).
        """
        return tuple(self._read_one(i) for i in range(self._nvml.nvmlDeviceGetCount()))

    def _read_one(self, index: int) -> GpuInfo:
        nv = self._nvml
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(nv.nvmlDeviceGetUUID(handle))
        except self.nvml_error as exc:
            return GpuInfo(
                index=index,
                uuid="",
                name="",
                memory_total_bytes=0,
                memory_used_bytes=0,
                utilization_pct=0.0,
                temperature_c=0.0,
                power_w=0.0,
                ecc_uncorrected=0,
                healthy=False,
                reason=f"nvml: {exc}",
                fake=self.fake,
            )
        problems: list[str] = []

        def optional(what: str, fn: Callable[[], _T], neutral: _T) -> _T:
            try:
                return fn()
            except self.nvml_error as exc:
                if getattr(exc, "value", None) == nv.NVML_ERROR_GPU_IS_LOST:
                    problems.append(f"nvml: {exc}")
                elif (index, what) not in self._degraded:
                    self._degraded.add((index, what))
                    log.info("GPU %d: %s unavailable (%s); reporting neutral", index, what, exc)
                return neutral

        memory = optional("memory", lambda: nv.nvmlDeviceGetMemoryInfo(handle), None)
        return GpuInfo(
            index=index,
            uuid=uuid,
            name=optional("name", lambda: _text(nv.nvmlDeviceGetName(handle)), ""),
            memory_total_bytes=int(memory.total) if memory is not None else 0,
            memory_used_bytes=int(memory.used) if memory is not None else 0,
            utilization_pct=optional(
                "utilization", lambda: float(nv.nvmlDeviceGetUtilizationRates(handle).gpu), 0.0
            ),
            temperature_c=optional(
                "temperature",
                lambda: float(nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU)),
                0.0,
            ),
            power_w=optional("power", lambda: nv.nvmlDeviceGetPowerUsage(handle) / 1000.0, 0.0),
            ecc_uncorrected=optional(
                "ecc",
                lambda: int(
                    nv.nvmlDeviceGetTotalEccErrors(
                        handle, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC
                    )
                ),
                0,
            ),
            healthy=not problems,
            reason="; ".join(dict.fromkeys(problems)),
            fake=self.fake,
        )

    def open_events(self) -> bool:
        """Register XID (and, where supported, double-bit ECC) events on every GPU.

        Returns:
            True when at least one GPU is registered; False (logged once, at info) when event sets
            are not supported, in which case there is no XID health.

        Raises:
            NVMLError: the GPU count could not be read (the set is still freed by :meth:`close`).
        """
        nv = self._nvml
        try:
            event_set = nv.nvmlEventSetCreate()
        except self.nvml_error as exc:
            log.info("NVML event sets not supported (%s): no XID health checks", exc)
            return False
        self._event_set = event_set  # from here on, close() frees it whatever happens
        wanted = nv.nvmlEventTypeXidCriticalError | nv.nvmlEventTypeDoubleBitEccError
        registered: set[str] = set()
        for index in range(nv.nvmlDeviceGetCount()):
            try:
                handle = nv.nvmlDeviceGetHandleByIndex(index)
                uuid = _text(nv.nvmlDeviceGetUUID(handle))
                try:
                    mask = wanted & nv.nvmlDeviceGetSupportedEventTypes(handle)
                except self.nvml_error:
                    mask = nv.nvmlEventTypeXidCriticalError
                if not mask & nv.nvmlEventTypeXidCriticalError:
                    raise nv.NVMLError_NotSupported()
                nv.nvmlDeviceRegisterEvents(handle, mask, event_set)
            except self.nvml_error as exc:
                log.warning("GPU %d: XID events not supported (%s): no XID health", index, exc)
                continue
            registered.add(uuid)
        self._event_uuids = frozenset(registered)
        if not registered:
            log.info("no GPU accepts NVML events: no XID health checks")
            self._event_set = None
            try:
                nv.nvmlEventSetFree(event_set)
            except self.nvml_error as exc:
                log.warning("nvmlEventSetFree failed: %s", exc)
            return False
        return True

    def wait_event(self, timeout_ms: int) -> GpuEvent | None:
        """Block up to ``timeout_ms`` for one event from the set :meth:`open_events` made.

        Args:
            timeout_ms: longest wait; a timeout (``NVMLError_Timeout``) is "no event".

        Returns:
            The event; None on timeout or for event types we do not act on. Any other NVML
            error is returned as a ``"wait_failed"`` event for every GPU, as the k8s plugin does.

        Raises:
            RuntimeError: :meth:`open_events` has not returned True.
        """
        if self._event_set is None:
            raise RuntimeError("wait_event() needs a successful open_events()")
        nv = self._nvml
        try:
            data = nv.nvmlEventSetWait(self._event_set, timeout_ms)
        except nv.NVMLError_Timeout:
            return None
        except self.nvml_error as exc:
            return GpuEvent(None, "wait_failed", detail=str(exc))
        uuid = self._event_uuid(data.device)
        if data.eventType & nv.nvmlEventTypeXidCriticalError:
            return GpuEvent(uuid, "xid", xid=int(data.eventData))
        if data.eventType & nv.nvmlEventTypeDoubleBitEccError:
            return GpuEvent(uuid, "ecc_double_bit")
        return None

    def _event_uuid(self, device: Any) -> str | None:
        if not device:  # a NULL handle: the event is for every GPU
            return None
        try:
            uuid = _text(self._nvml.nvmlDeviceGetUUID(device))
        except self.nvml_error:
            return None
        return uuid if uuid in self._event_uuids else None


def load_nvml() -> Any | None:
    """Import ``pynvml``.

    Returns:
        The module, or None when it is not installed.
    """
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        return None


def _say_cpu_only(why: str) -> None:
    log.info("NVML unavailable (%s): no GPUs, running CPU engines only", why)


def discover(nvml_module: Any | None = None) -> tuple[GpuInfo, ...]:
    """Read the node's GPUs once (no XID health): for the CLI.

    Args:
        nvml_module: a ``pynvml``-shaped module; None imports ``pynvml``.

    Returns:
        The GPUs, or ``()`` when NVML is unavailable (one info line is logged).
    """
    nvml = nvml_module if nvml_module is not None else load_nvml()
    if nvml is None:
        _say_cpu_only("pynvml is not installed")
        return ()
    reader = NvmlReader(nvml)
    try:
        reader.open()
    except NvmlUnavailableError as exc:
        _say_cpu_only(str(exc))
        return ()
    try:
        return reader.read()
    except reader.nvml_error as exc:
        _say_cpu_only(f"cannot count GPUs: {exc}")
        return ()
    finally:
        reader.close()


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
            _say_cpu_only("pynvml is not installed")
            task_status.started()
            await trio.sleep_forever()
        reader = NvmlReader(nvml)
        try:
            await trio.to_thread.run_sync(reader.open, limiter=NVML_LIMITER)
        except NvmlUnavailableError as exc:
            _say_cpu_only(str(exc))
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
