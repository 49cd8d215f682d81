"""Blocking NVML access (:class:`NvmlReader`, called from worker threads) and a one-shot read
for the CLI (:func:`discover`).

Without NVML (``pynvml`` not importable, no ``libnvidia-ml``, driver not loaded) discovery
returns no GPUs and the agent runs CPU engines only; nothing here raises for that.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from fleet.protocol.errors import FleetError
from fleet.protocol.messages import GpuInfo

from .gpuhealth import GpuEvent

log = logging.getLogger("fleet.agent.gpus")  # their log lines keep the name they had

_T = TypeVar("_T")


class NvmlUnavailableError(FleetError):
    """Raised by :meth:`NvmlReader.open` when NVML cannot start (library or driver missing).

    Callers treat it as "no GPUs on this node", not as a failure.
    """


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


def say_cpu_only(why: str) -> None:
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
        say_cpu_only("pynvml is not installed")
        return ()
    reader = NvmlReader(nvml)
    try:
        reader.open()
    except NvmlUnavailableError as exc:
        say_cpu_only(str(exc))
        return ()
    try:
        return reader.read()
    except reader.nvml_error as exc:
        say_cpu_only(f"cannot count GPUs: {exc}")
        return ()
    finally:
        reader.close()


__all__ = ["NvmlReader", "NvmlUnavailableError", "discover", "load_nvml", "say_cpu_only"]
