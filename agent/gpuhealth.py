"""GPU health from NVML's events, sans-I/O: :class:`GpuHealth` takes :class:`GpuEvent` values
and merges them into readings.

XID handling follows NVIDIA's k8s-device-plugin: application XIDs (13, 31, 43, 45, 68, 109 by
default) are recorded but leave the GPU healthy; any other XID, a double-bit ECC event or a
failed event wait marks the GPU (or, without a known device, every GPU) unhealthy. Unhealthy is
sticky until the agent restarts, as in the plugin.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Literal

from fleet.protocol.messages import GpuInfo

log = logging.getLogger("fleet.agent.gpus")  # their log lines keep the name they had

#: XIDs an application causes (NVIDIA's k8s-device-plugin list): recorded, GPU left healthy.
DEFAULT_APPLICATION_XIDS: frozenset[int] = frozenset({13, 31, 43, 45, 68, 109})
_MAX_XIDS = 64  # recent XIDs kept for reporting; health reasons are kept apart and never dropped


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


__all__ = ["DEFAULT_APPLICATION_XIDS", "GpuEvent", "GpuHealth"]
