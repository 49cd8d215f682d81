"""Fake GPUs for machines that have none: a ``pynvml``-shaped module built from ``--fake-gpus``.

:func:`parse_fake_gpus` turns a SPEC such as ``4x80GiB,2x24GiB:unhealthy`` into
:class:`FakeGpuSpec` values; :class:`FakeNvml` serves them through the same functions, constants
and error classes as ``pynvml``, so :class:`fleet.agent.gpus.GpuMonitor` runs its real reading and
XID-health code over them. Its ``FLEET_FAKE`` attribute makes :class:`~fleet.agent.nvml.NvmlReader`
mark every reading ``fake=True``, which ``fleet gpus``, ``/api/v1/gpus`` and the coordinator's
``/api/v1/nodes`` show.

A GPU given as ``:unhealthy`` answers every reading with ``GPU is lost``, as a GPU that fell off
the bus does, so it is unhealthy from the first reading on. :meth:`FakeNvml.inject_xid` queues an
XID event for one GPU (the agent's ``POST /api/v1/gpus/{index}/xid``), which the monitor's event
watcher picks up as it would a real one.

Engines placed on fake GPUs are launched as CPU engines (no ``CUDA_VISIBLE_DEVICES``, no
``--tensor-parallel-size``; see :class:`fleet.agent.launcher.LaunchConfig`), so they run as
simulators or CPU vLLM.
"""

from __future__ import annotations

import queue
import re
import threading
from dataclasses import dataclass
from types import SimpleNamespace

from fleet.protocol.errors import ConfigError

__all__ = ["DEFAULT_FAULT_XID", "FakeGpuSpec", "FakeNvml", "parse_fake_gpus"]

FLAG = "--fake-gpus"
#: The XID :meth:`FakeNvml.inject_xid` sends when none is given: 79, "GPU has fallen off the bus".
DEFAULT_FAULT_XID = 79
_UNITS = {"MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_ITEM = re.compile(
    r"^(\d+)x(\d+(?:\.\d+)?)(MiB|GiB|TiB|MB|GB|TB)(?:@([a-z][a-z0-9]*\d[a-z0-9]*))?(?::(unhealthy))?$"
)
_MAX_GPUS = 64


@dataclass(frozen=True)
class FakeGpuSpec:
    """One fake GPU.

    Args:
        memory_bytes: total memory.
        healthy: False for a GPU that is lost from the start.
        tier: the GPU model it stands for (``h100``, ``l4``); its name then says it, so that
            placement reads the tier as from a real GPU's name.
    """

    memory_bytes: int
    healthy: bool = True
    tier: str = ""

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0:
            raise ConfigError("memory_bytes", self.memory_bytes, "must be > 0")


def parse_fake_gpus(spec: str, *, flag: str = FLAG) -> tuple[FakeGpuSpec, ...]:
    """Parse a ``--fake-gpus`` value: comma-separated ``NxSIZE[@TIER][:unhealthy]`` items.

    Args:
        spec: for example ``4x80GiB@h100,2x24GiB@l4:unhealthy``; sizes in MiB, GiB, TiB, MB, GB
            or TB; a TIER is a GPU model name with a digit (``h100``, ``a10g``, ``rtx4090``).
        flag: the flag named in errors.

    Returns:
        One :class:`FakeGpuSpec` per GPU, in index order.

    Raises:
        ConfigError: an empty SPEC, a malformed item, a zero count or size, or more than 64 GPUs
            (the message names the flag and the item).
    """
    items = [item.strip() for item in spec.split(",")]
    if not spec.strip() or not all(items):
        raise ConfigError(
            flag, spec, "expected NxSIZE[@TIER][:unhealthy] items separated by commas"
        )
    gpus: list[FakeGpuSpec] = []
    for item in items:
        match = _ITEM.match(item)
        if match is None:
            raise ConfigError(
                flag,
                item,
                "expected NxSIZE[@TIER][:unhealthy], for example 4x80GiB, 4x80GiB@h100 or "
                "2x24GiB:unhealthy (a TIER is lower case with a digit: h100, l4, a10g)",
            )
        count, size, unit, tier, unhealthy = match.groups()
        memory = int(float(size) * _UNITS[unit])
        if int(count) == 0 or memory == 0:
            raise ConfigError(flag, item, "count and size must be > 0")
        gpus += [FakeGpuSpec(memory, healthy=unhealthy is None, tier=tier or "")] * int(count)
    if len(gpus) > _MAX_GPUS:
        raise ConfigError(flag, spec, f"at most {_MAX_GPUS} GPUs")
    return tuple(gpus)


class NVMLError(Exception):
    """Base of the fake's errors, as ``pynvml.NVMLError``; ``value`` is NVML's return code."""

    value = 999
    text = "Unknown Error"

    def __str__(self) -> str:
        return self.text


# The error classes keep pynvml's names, so the reader sees the same attributes.
class NVMLError_Uninitialized(NVMLError):  # noqa: N801
    value, text = 1, "Uninitialized"


class NVMLError_NotSupported(NVMLError):  # noqa: N801
    value, text = 3, "Not Supported"


class NVMLError_Timeout(NVMLError):  # noqa: N801
    value, text = 10, "Timeout"


class NVMLError_GpuIsLost(NVMLError):  # noqa: N801
    value, text = 15, "GPU is lost"


@dataclass(frozen=True)
class _Device:
    """A device handle: the GPU's index and UUID."""

    index: int
    uuid: str
    spec: FakeGpuSpec


class FakeNvml:
    """The part of ``pynvml`` that :mod:`fleet.agent.gpus` uses, over fake GPUs.

    Thread-safe as NVML is: readings are immutable, and events go through a queue.

    Args:
        gpus: the GPUs, in index order (from :func:`parse_fake_gpus`).
        node: a name folded into the UUIDs, so two agents' fake GPUs never share one.
    """

    FLEET_FAKE = True
    NVMLError = NVMLError
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_Timeout = NVMLError_Timeout
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVML_ERROR_GPU_IS_LOST = 15
    NVML_TEMPERATURE_GPU = 0
    NVML_VOLATILE_ECC = 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    nvmlEventTypeSingleBitEccError = 0x1
    nvmlEventTypeDoubleBitEccError = 0x2
    nvmlEventTypeXidCriticalError = 0x8

    def __init__(self, gpus: tuple[FakeGpuSpec, ...], *, node: str = "node") -> None:
        tag = re.sub(r"[^0-9A-Za-z]", "-", node)[:32]
        self._devices = tuple(
            _Device(i, f"GPU-fake-{tag}-{i:02d}", spec) for i, spec in enumerate(gpus)
        )
        self._lock = threading.Lock()
        self._initialised = 0
        self._events: queue.Queue[SimpleNamespace] = queue.Queue()

    @property
    def count(self) -> int:
        """How many fake GPUs there are."""
        return len(self._devices)

    # -- session ---------------------------------------------------------------------------

    def nvmlInit(self) -> None:  # noqa: N802
        with self._lock:
            self._initialised += 1

    def nvmlShutdown(self) -> None:  # noqa: N802
        with self._lock:
            if not self._initialised:
                raise NVMLError_Uninitialized()
            self._initialised -= 1

    def _need_init(self) -> None:
        if not self._initialised:
            raise NVMLError_Uninitialized()

    # -- devices ---------------------------------------------------------------------------

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        self._need_init()
        return len(self._devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Device:  # noqa: N802
        self._need_init()
        return self._devices[index]

    def nvmlDeviceGetUUID(self, device: _Device) -> str:  # noqa: N802
        self._need_init()
        return device.uuid

    def _reading(self, device: _Device) -> None:
        self._need_init()
        if not device.spec.healthy:
            raise NVMLError_GpuIsLost()

    def nvmlDeviceGetName(self, device: _Device) -> str:  # noqa: N802
        self._reading(device)
        size = f"{device.spec.memory_bytes / 1024**3:g}GiB"
        tier = device.spec.tier
        return f"Fake NVIDIA {tier.upper()} {size}" if tier else f"Fake GPU {size}"

    def nvmlDeviceGetMemoryInfo(self, device: _Device) -> SimpleNamespace:  # noqa: N802
        self._reading(device)
        total = device.spec.memory_bytes
        return SimpleNamespace(total=total, free=total, used=0)

    def nvmlDeviceGetUtilizationRates(self, device: _Device) -> SimpleNamespace:  # noqa: N802
        self._reading(device)
        return SimpleNamespace(gpu=0, memory=0)

    def nvmlDeviceGetTemperature(self, device: _Device, sensor: int) -> int:  # noqa: N802
        self._reading(device)
        return 30

    def nvmlDeviceGetPowerUsage(self, device: _Device) -> int:  # noqa: N802
        self._reading(device)
        return 50_000  # milliwatts

    def nvmlDeviceGetTotalEccErrors(  # noqa: N802
        self, device: _Device, error_type: int, counter: int
    ) -> int:
        self._reading(device)
        return 0

    # -- events ----------------------------------------------------------------------------

    def nvmlEventSetCreate(self) -> object:  # noqa: N802
        self._need_init()
        return object()

    def nvmlDeviceGetSupportedEventTypes(self, device: _Device) -> int:  # noqa: N802
        return self.nvmlEventTypeDoubleBitEccError | self.nvmlEventTypeXidCriticalError

    def nvmlDeviceRegisterEvents(  # noqa: N802
        self, device: _Device, mask: int, event_set: object
    ) -> None:
        self._need_init()

    def nvmlEventSetWait(self, event_set: object, timeout_ms: int) -> SimpleNamespace:  # noqa: N802
        try:
            return self._events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise NVMLError_Timeout() from None

    def nvmlEventSetFree(self, event_set: object) -> None:  # noqa: N802
        return None

    # -- faults ----------------------------------------------------------------------------

    def inject_xid(self, index: int, xid: int = DEFAULT_FAULT_XID) -> None:
        """Queue an XID event for GPU ``index``, as the driver would report a fault.

        Raises:
            IndexError: there is no fake GPU ``index``.
        """
        if not 0 <= index < len(self._devices):
            raise IndexError(index)
        self._events.put(
            SimpleNamespace(
                device=self._devices[index],
                eventType=self.nvmlEventTypeXidCriticalError,
                eventData=xid,
            )
        )
