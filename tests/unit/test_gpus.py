"""GPU discovery and XID health (fleet.agent.gpus) against a fake NVML module.

The fake stands in for ``pynvml`` only: same function names, constants and error classes, over
scripted GPUs. Tests assert readings, health and the fake's end state, never call sequences.
The monitor tests use real worker threads: they wait with ``GpuMonitor.updated()`` under
``trio.fail_after`` (each takes well under 1 s).
"""

from __future__ import annotations

import logging
import queue
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from fleet.agent.gpus import (
    GpuConfig,
    GpuHealth,
    GpuMonitor,
    NvmlReader,
    NvmlUnavailableError,
    discover,
)
from fleet.protocol.errors import ConfigError
from fleet.protocol.messages import GpuInfo

GIB = 1024**3


class NVMLError(Exception):
    value = 999
    text = "Unknown Error"

    def __str__(self) -> str:
        return self.text


# The error classes keep pynvml's names, so the reader sees the same attributes.
class NVMLError_NotSupported(NVMLError):
    value, text = 3, "Not Supported"


class NVMLError_Uninitialized(NVMLError):
    value, text = 1, "Uninitialized"


class NVMLError_Timeout(NVMLError):
    value, text = 10, "Timeout"


class NVMLError_LibraryNotFound(NVMLError):
    value, text = 12, "NVML Shared Library Not Found"


class NVMLError_GpuIsLost(NVMLError):
    value, text = 15, "GPU is lost"


@dataclass(eq=False)
class FakeGpu:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    memory_total: int = 80 * GIB
    memory_used: int = 1 * GIB
    util_pct: int = 37
    temp_c: int = 41
    power_mw: int = 123_456
    ecc_uncorrected: int = 2
    unsupported: set[str] = field(default_factory=set)  # readings that raise NotSupported
    lost: bool = False  # every reading after the handle raises GpuIsLost
    no_handle: bool = False  # nvmlDeviceGetHandleByIndex raises GpuIsLost


class FakeNvml:
    """The subset of ``pynvml`` that gpus.py uses; a device handle is the FakeGpu itself."""

    NVMLError = NVMLError
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_Timeout = NVMLError_Timeout
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVML_ERROR_GPU_IS_LOST = 15
    NVML_TEMPERATURE_GPU = 0
    NVML_VOLATILE_ECC = 0
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
    nvmlEventTypeSingleBitEccError = 0x1
    nvmlEventTypeDoubleBitEccError = 0x2
    nvmlEventTypeXidCriticalError = 0x8

    def __init__(
        self,
        gpus: list[FakeGpu],
        *,
        init_error: Exception | None = None,
        events_supported: bool = True,
    ) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.events_supported = events_supported
        self.initialised = False
        self.open_event_sets = 0
        self.registered: dict[str, int] = {}  # uuid -> event mask
        self.events: queue.Queue[SimpleNamespace] = queue.Queue()

    # Session
    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self._need_init()
        self.initialised = False

    def _need_init(self) -> None:
        if not self.initialised:
            raise NVMLError_Uninitialized()

    # Devices
    def nvmlDeviceGetCount(self) -> int:
        self._need_init()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._need_init()
        if self.gpus[index].no_handle:
            raise NVMLError_GpuIsLost()
        return self.gpus[index]

    def _reading(self, gpu: FakeGpu, what: str) -> None:
        self._need_init()
        if gpu.lost:
            raise NVMLError_GpuIsLost()
        if what in gpu.unsupported:
            raise NVMLError_NotSupported()

    def nvmlDeviceGetUUID(self, gpu: FakeGpu) -> str:
        self._need_init()
        return gpu.uuid

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> str:
        self._reading(gpu, "name")
        return gpu.name

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu) -> SimpleNamespace:
        self._reading(gpu, "memory")
        free = gpu.memory_total - gpu.memory_used
        return SimpleNamespace(total=gpu.memory_total, free=free, used=gpu.memory_used)

    def nvmlDeviceGetUtilizationRates(self, gpu: FakeGpu) -> SimpleNamespace:
        self._reading(gpu, "utilization")
        return SimpleNamespace(gpu=gpu.util_pct, memory=5)

    def nvmlDeviceGetTemperature(self, gpu: FakeGpu, sensor: int) -> int:
        self._reading(gpu, "temperature")
        assert sensor == self.NVML_TEMPERATURE_GPU
        return gpu.temp_c

    def nvmlDeviceGetPowerUsage(self, gpu: FakeGpu) -> int:
        self._reading(gpu, "power")
        return gpu.power_mw

    def nvmlDeviceGetTotalEccErrors(self, gpu: FakeGpu, error_type: int, counter: int) -> int:
        self._reading(gpu, "ecc")
        assert (error_type, counter) == (self.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, 0)
        return gpu.ecc_uncorrected

    # Events
    def nvmlEventSetCreate(self) -> object:
        self._need_init()
        if not self.events_supported:
            raise NVMLError_NotSupported()
        self.open_event_sets += 1
        return object()

    def nvmlDeviceGetSupportedEventTypes(self, gpu: FakeGpu) -> int:
        return 0xB  # single-bit, double-bit, XID

    def nvmlDeviceRegisterEvents(self, gpu: FakeGpu, mask: int, event_set: object) -> None:
        self.registered[gpu.uuid] = mask

    def nvmlEventSetWait(self, event_set: object, timeout_ms: int) -> SimpleNamespace:
        try:
            return self.events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise NVMLError_Timeout() from None

    def nvmlEventSetFree(self, event_set: object) -> None:
        self.open_event_sets -= 1

    # Test controls
    def inject(self, device: FakeGpu | None, event_type: int, data: int = 0) -> None:
        self.events.put(SimpleNamespace(device=device, eventType=event_type, eventData=data))

    def inject_xid(self, device: FakeGpu | None, xid: int) -> None:
        self.inject(device, self.nvmlEventTypeXidCriticalError, xid)


def two_gpus() -> list[FakeGpu]:
    return [FakeGpu("GPU-aaaa"), FakeGpu("GPU-bbbb", memory_used=3 * GIB, power_mw=700_000)]


def opened(fake: FakeNvml) -> NvmlReader:
    reader = NvmlReader(fake)
    reader.open()
    return reader


def health_after(fake: FakeNvml, *xid_events: tuple[FakeGpu | None, int]) -> tuple[GpuInfo, ...]:
    """Register events, inject ``(device, xid)`` pairs, feed them to GpuHealth, merge readings."""
    reader = opened(fake)
    assert reader.open_events()
    health = GpuHealth()
    for device, xid in xid_events:
        fake.inject_xid(device, xid)
        event = reader.wait_event(1000)
        assert event is not None
        health.record(event)
    return health.apply(reader.read())


# Readings


def test_readings_map_fields_and_units() -> None:
    gpus = opened(FakeNvml(two_gpus())).read()

    assert gpus[0] == GpuInfo(
        index=0,
        uuid="GPU-aaaa",
        name="NVIDIA H100 80GB HBM3",
        memory_total_bytes=80 * GIB,
        memory_used_bytes=1 * GIB,
        utilization_pct=37.0,
        temperature_c=41.0,
        power_w=123.456,  # NVML reports milliwatts
        ecc_uncorrected=2,
        healthy=True,
    )
    assert (gpus[1].index, gpus[1].uuid, gpus[1].power_w) == (1, "GPU-bbbb", 700.0)
    assert gpus[1].memory_used_bytes == 3 * GIB


def test_unsupported_readings_degrade_to_neutral_values() -> None:
    fake = FakeNvml(two_gpus())
    fake.gpus[0].unsupported = {"name", "memory", "utilization", "temperature", "power", "ecc"}

    gpu, other = opened(fake).read()

    assert gpu == GpuInfo(0, "GPU-aaaa", "", 0, 0, 0.0, 0.0, 0.0, 0, healthy=True)
    assert other.name == "NVIDIA H100 80GB HBM3" and other.healthy


def test_lost_gpu_is_reported_unhealthy_not_dropped() -> None:
    fake = FakeNvml(two_gpus())
    fake.gpus[0].lost = True
    fake.gpus[1].no_handle = True

    lost, no_handle = opened(fake).read()

    assert (lost.uuid, lost.healthy, lost.reason) == ("GPU-aaaa", False, "nvml: GPU is lost")
    assert (no_handle.index, no_handle.healthy, no_handle.reason) == (1, False, "nvml: GPU is lost")


# Fallback without NVML


def test_missing_library_means_no_gpus(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fleet.agent.gpus")
    fake = FakeNvml(two_gpus(), init_error=NVMLError_LibraryNotFound())

    assert discover(fake) == ()
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "CPU engines only" in caplog.records[0].getMessage()
    with pytest.raises(NvmlUnavailableError, match="Library Not Found"):
        NvmlReader(fake).open()


def test_pynvml_not_installed_means_no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError

    assert discover() == ()


def test_discover_reads_then_shuts_nvml_down() -> None:
    fake = FakeNvml(two_gpus())

    assert [gpu.uuid for gpu in discover(fake)] == ["GPU-aaaa", "GPU-bbbb"]
    assert not fake.initialised


# XID health (sans-I/O: the events are queued before the wait)


def test_application_xid_is_recorded_but_gpu_stays_healthy() -> None:
    fake = FakeNvml(two_gpus())

    gpu, other = health_after(fake, (fake.gpus[0], 31))

    assert (gpu.healthy, gpu.xids, gpu.reason) == (True, (31,), "")
    assert (other.healthy, other.xids) == (True, ())


def test_xid_79_marks_only_that_gpu_unhealthy() -> None:
    fake = FakeNvml(two_gpus())

    gpu, other = health_after(fake, (fake.gpus[1], 13), (fake.gpus[0], 79))

    assert (gpu.healthy, gpu.xids, gpu.reason) == (False, (79,), "xid 79")
    assert (other.healthy, other.xids) == (True, (13,))


@pytest.mark.parametrize("device", [None, FakeGpu("GPU-not-registered")], ids=["all", "unknown"])
def test_event_without_a_known_device_marks_every_gpu_unhealthy(device: FakeGpu | None) -> None:
    fake = FakeNvml(two_gpus())

    gpus = health_after(fake, (device, 48))

    assert [(g.healthy, g.xids, g.reason) for g in gpus] == [(False, (48,), "xid 48")] * 2


def test_double_bit_ecc_event_marks_gpu_unhealthy_and_timeout_is_no_event() -> None:
    fake = FakeNvml(two_gpus())
    reader = opened(fake)
    assert reader.open_events()
    health = GpuHealth()

    assert reader.wait_event(1) is None  # NVMLError_Timeout
    fake.inject(fake.gpus[1], fake.nvmlEventTypeDoubleBitEccError)
    event = reader.wait_event(1000)
    assert event is not None
    health.record(event)

    assert [(g.healthy, g.reason) for g in health.apply(reader.read())] == [
        (True, ""),
        (False, "double-bit ecc error"),
    ]
    assert fake.registered == {"GPU-aaaa": 0xA, "GPU-bbbb": 0xA}  # XID + double-bit ECC
    reader.close()
    assert (fake.open_event_sets, fake.initialised) == (0, False)


# The service (real worker threads)


async def test_monitor_sees_injected_xid_and_stops_promptly_on_cancel() -> None:
    fake = FakeNvml(two_gpus())
    monitor = GpuMonitor(GpuConfig(refresh_s=0.05, xid_wait_ms=20), nvml_module=fake)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(monitor.run)
            assert monitor.available
            assert [(g.uuid, g.healthy) for g in monitor.snapshot()] == [
                ("GPU-aaaa", True),
                ("GPU-bbbb", True),
            ]

            fake.inject_xid(fake.gpus[1], 79)
            while monitor.snapshot()[1].healthy:
                await monitor.updated()
            nursery.cancel_scope.cancel()
            cancelled_at = trio.current_time()

    assert trio.current_time() - cancelled_at < 0.5  # one 20 ms wait, not a hang
    gpu, other = monitor.snapshot()
    assert (other.healthy, other.xids, other.reason) == (False, (79,), "xid 79")
    assert gpu.healthy
    assert not monitor.available
    assert (fake.initialised, fake.open_event_sets) == (False, 0)  # event set freed, NVML shut


async def test_monitor_without_nvml_runs_cpu_engines_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fleet.agent.gpus")
    fake = FakeNvml(two_gpus(), init_error=NVMLError_LibraryNotFound())
    monitor = GpuMonitor(nvml_module=fake)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(monitor.run)
            assert (monitor.snapshot(), monitor.available) == ((), False)
            nursery.cancel_scope.cancel()

    assert [r.getMessage() for r in caplog.records] == [
        "NVML unavailable (NVML Shared Library Not Found): no GPUs, running CPU engines only"
    ]


async def test_monitor_without_event_sets_keeps_refreshing_readings() -> None:
    fake = FakeNvml(two_gpus(), events_supported=False)
    monitor = GpuMonitor(GpuConfig(refresh_s=0.01), nvml_module=fake)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(monitor.run)
            assert monitor.snapshot()[0].memory_used_bytes == 1 * GIB

            fake.gpus[0].memory_used = 7 * GIB
            while monitor.snapshot()[0].memory_used_bytes != 7 * GIB:
                await monitor.updated()
            nursery.cancel_scope.cancel()

    assert all(gpu.healthy for gpu in monitor.snapshot())
    assert (fake.initialised, fake.open_event_sets) == (False, 0)


@pytest.mark.parametrize(
    ("key", "value"),
    [("refresh_s", 0.0), ("refresh_s", float("nan")), ("xid_wait_ms", 0), ("grace_s", -1.0)],
)
def test_config_rejects_out_of_range_values(key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=key):
        GpuConfig(**{key: value})
