"""The agent's metrics read from its state when ``/metrics`` is scraped: GPUs and model cache.

:class:`AgentStateCollector` is a prometheus-client collector, so the values are as fresh as
the agent's last NVML reading and the store's state at scrape time, and series of GPUs or
downloads that are gone disappear with them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .config import AgentConfig
    from .gpus import GpuMonitor
    from .store import ModelStore


class Observed(Protocol):
    """What the collector reads of an :class:`~.service.Agent`."""

    cfg: AgentConfig
    gpus: GpuMonitor
    store: ModelStore | None


def _gauge(name: str, doc: str, *labels: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


class AgentStateCollector(Collector):
    """Yields the GPU and model-cache families (see the module docstring).

    Args:
        agent: the agent; read at each scrape, never written.
    """

    def __init__(self, agent: Observed) -> None:
        self.agent = agent

    def describe(self) -> Iterator[Metric]:
        """The families' names and types, without reading any state (registration)."""
        yield from self._build(fill=False)

    def collect(self) -> Iterator[Metric]:
        """Every family, filled from the agent's state now."""
        yield from self._build(fill=True)

    def _build(self, *, fill: bool) -> Iterator[Metric]:
        info = InfoMetricFamily(
            "fleet_agent_gpu", "Each GPU's UUID and product name, by index.", labels=["gpu"]
        )
        gpu = {
            "used": _gauge("fleet_agent_gpu_memory_used_bytes", "GPU memory in use.", "gpu"),
            "total": _gauge("fleet_agent_gpu_memory_total_bytes", "GPU memory in all.", "gpu"),
            "util": _gauge(
                "fleet_agent_gpu_utilization_ratio",
                "Fraction of the last sample period the GPU was busy (0..1).", "gpu",
            ),
            "temp": _gauge("fleet_agent_gpu_temperature_celsius", "GPU core temperature.", "gpu"),
            "power": _gauge("fleet_agent_gpu_power_watts", "GPU power draw.", "gpu"),
            "ecc": _gauge(
                "fleet_agent_gpu_ecc_uncorrected_errors",
                "Uncorrected ECC errors NVML reports for the GPU (its volatile count).", "gpu",
            ),
            "healthy": _gauge(
                "fleet_agent_gpu_healthy",
                "1 if the GPU is healthy, 0 after a fatal XID, a double-bit ECC error or a "
                "failed reading (engines leave it).", "gpu",
            ),
        }  # fmt: skip
        xids = CounterMetricFamily(
            "fleet_agent_gpu_xid_errors",
            "XID events NVML reported since the agent started, by GPU and XID (application "
            "XIDs included, 13, 31, 43, 45, 68 and 109 by default: they leave the GPU healthy).",
            labels=["gpu", "xid"],
        )
        cache = {
            "bytes": _gauge("fleet_agent_model_cache_bytes", "Bytes of complete cached models."),
            "models": _gauge("fleet_agent_model_cache_models", "Complete models in the cache."),
            "pinned": _gauge(
                "fleet_agent_model_cache_pinned_models", "Cached models an engine uses now."
            ),
            "budget": _gauge(
                "fleet_agent_model_cache_budget_bytes",
                "The most the cache may hold (0: only the disk's free space limits it).",
            ),
            "fetches": _gauge(
                "fleet_agent_model_downloads",
                "Model fetches by state: listing, downloading, failed (the last failure of a "
                "model not fetched since).",
                "state",
            ),
            "done": _gauge(
                "fleet_agent_model_download_bytes",
                "Bytes of a model fetch in flight on disk and verified, by model (its URI).",
                "model",
            ),
            "size": _gauge(
                "fleet_agent_model_download_size_bytes",
                "Size of a model being fetched (0 while listing), by model (its URI).",
                "model",
            ),
            "rate": _gauge(
                "fleet_agent_model_download_rate_bytes_per_second",
                "Recent download speed of a model fetch in flight, by model (its URI).",
                "model",
            ),
        }
        if fill:
            self._gpus(info, gpu, xids)
            self._cache(cache)
        yield from (info, *gpu.values(), xids, *cache.values())

    def _gpus(
        self, info: InfoMetricFamily, fam: dict[str, GaugeMetricFamily], xids: CounterMetricFamily
    ) -> None:
        monitor = self.agent.gpus
        for g in monitor.snapshot():
            label = [str(g.index)]
            info.add_metric(label, {"uuid": g.uuid, "name": g.name})
            fam["used"].add_metric(label, g.memory_used_bytes)
            fam["total"].add_metric(label, g.memory_total_bytes)
            fam["util"].add_metric(label, g.utilization_pct / 100)
            fam["temp"].add_metric(label, g.temperature_c)
            fam["power"].add_metric(label, g.power_w)
            fam["ecc"].add_metric(label, g.ecc_uncorrected)
            fam["healthy"].add_metric(label, 1 if g.healthy else 0)
        for (index, xid), n in sorted(monitor.xid_counts().items()):
            xids.add_metric([str(index), str(xid)], n)

    def _cache(self, fam: dict[str, GaugeMetricFamily]) -> None:
        store = self.agent.store
        models = store.models() if store is not None else ()
        fam["bytes"].add_metric([], sum(m.size_bytes for m in models))
        fam["models"].add_metric([], len(models))
        fam["pinned"].add_metric([], sum(1 for m in models if m.pinned_by))
        cfg = self.agent.cfg.store
        fam["budget"].add_metric([], cfg.budget_bytes if cfg is not None else 0)
        fetches = store.progress() if store is not None else ()
        states = dict.fromkeys(("listing", "downloading", "failed"), 0)
        for p in fetches:
            states[p.state] = states.get(p.state, 0) + 1
            if p.state != "failed":
                fam["done"].add_metric([p.uri], p.bytes_done)
                fam["size"].add_metric([p.uri], p.bytes_total)
                fam["rate"].add_metric([p.uri], p.rate_bps)
        for state, n in states.items():
            fam["fetches"].add_metric([state], n)


__all__ = ["AgentStateCollector", "Observed"]
