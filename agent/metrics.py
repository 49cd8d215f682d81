"""The agent's Prometheus metrics, in a registry each agent owns (no globals).

GPU and model-cache metrics are read from the agent's state at scrape time
(:mod:`.statemetrics`, registered in this registry by the agent)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, generate_latest

import fleet


class AgentMetrics:
    """Every metric the agent exports on ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.engine_restarts = Counter(
            "fleet_agent_engine_restarts_total",
            "Engine restarts after a crash.",
            ["engine"],
            registry=r,
        )
        self.engine_state = Gauge(
            "fleet_agent_engine_state",
            "1 for the engine's current state.",
            ["engine", "state"],
            registry=r,
        )
        self.kv_batches = Counter(
            "fleet_agent_kv_batches_total", "KV event batches relayed.", ["engine"], registry=r
        )
        self.kv_events = Counter(
            "fleet_agent_kv_events_total", "KV events relayed.", ["engine"], registry=r
        )
        self.kv_rejected = Counter(
            "fleet_agent_kv_rejected_total",
            "KV frames from engines that could not be decoded.",
            ["engine"],
            registry=r,
        )
        self.kv_gaps = Counter(
            "fleet_agent_kv_gaps_total",
            "Sequence gaps in an engine's KV stream.",
            ["engine"],
            registry=r,
        )
        self.kv_replays = Counter(
            "fleet_agent_kv_replays_total",
            "Replay requests sent to an engine's KV replay socket to repair a gap.",
            ["engine"],
            registry=r,
        )
        self.kv_replayed_batches = Counter(
            "fleet_agent_kv_replayed_batches_total",
            "KV batches recovered by replay and forwarded.",
            ["engine"],
            registry=r,
        )
        self.kv_tail_repaired = Counter(
            "fleet_agent_kv_tail_repaired_total",
            "KV batches found lost only by asking the replay socket after a quiet spell (the "
            "engine's last batches, which no later batch revealed).",
            ["engine"],
            registry=r,
        )
        self.kv_snapshot_blocks = Counter(
            "fleet_agent_kv_snapshot_blocks_total",
            "Blocks sent in snapshots to a coordinator that (re)connected.",
            ["engine"],
            registry=r,
        )
        self.kv_resyncs = Counter(
            "fleet_agent_kv_resyncs_total",
            "Gaps replay could not repair, forwarded as a resync.",
            ["engine"],
            registry=r,
        )
        self.kv_duplicates = Counter(
            "fleet_agent_kv_duplicates_total",
            "KV batches dropped because their sequence number was already forwarded.",
            ["engine"],
            registry=r,
        )
        self.kv_dropped = Counter(
            "fleet_agent_kv_dropped_total",
            "KV batches not forwarded (link full).",
            ["engine"],
            registry=r,
        )
        self.link_rejected = Counter(
            "fleet_agent_link_rejected_total",
            "Coordinator frames rejected, and failed CURVE handshakes (curve_handshake), "
            "by reason.",
            ["reason"],
            registry=r,
        )
        self.link_dropped = Counter(
            "fleet_agent_link_send_dropped_total",
            "Messages to the coordinator not sent.",
            registry=r,
        )
        self.build = Info("fleet_agent_build", "The agent's version.", registry=r)
        self.build.info({"version": fleet.__version__})

    def render(self) -> bytes:
        """Return the text exposition of every metric."""
        return generate_latest(self.registry)


__all__ = ["AgentMetrics"]
