"""Crash loops: an engine that keeps restarting on one node is moved to another. Sans-I/O.

The agent restarts a crashed engine with backoff and counts its restarts (``EngineStatus.
restarts``, cumulative while the engine is assigned there). :meth:`CrashLoops.observe` takes what
live nodes report and ``now``; an engine that restarted ``limit`` times within ``window_s`` on one
node is *looping* there. :meth:`CrashLoops.to_move` returns such engines when another healthy
node exists (moving a loop to nowhere helps nobody); once told one was stopped
(:meth:`CrashLoops.moved`), that node is :meth:`avoided` for the engine for ``window_s``, so
placement puts it elsewhere. Healthy engines are never reported.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from fleet.protocol.errors import ConfigError

from .registry import FleetRegistry


@dataclass
class CrashLoops:
    """Crash-loop detection and the nodes each engine avoids (see the module docstring).

    Raises:
        ConfigError: ``limit`` below 1 or a window not above 0.
    """

    limit: int = 5
    window_s: float = 600.0
    # (node, engine) -> (last restart count seen, times a restart was seen)
    _seen: dict[tuple[str, str], tuple[int, deque[float]]] = field(default_factory=dict)
    _avoid: dict[str, dict[str, float]] = field(default_factory=dict)  # engine -> node -> until

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ConfigError("crash_loop_restarts", self.limit, "must be >= 1")
        if not self.window_s > 0:
            raise ConfigError("crash_loop_window_s", self.window_s, "must be > 0")

    def observe(self, registry: FleetRegistry, now: float) -> None:
        """Take the restart counts live nodes report now."""
        present: set[tuple[str, str]] = set()
        for node in registry.live_nodes():
            for engine_id, engine in node.engines.items():
                key = (node.node_id, engine_id)
                present.add(key)
                last, times = self._seen.get(key, (engine.restarts, deque()))
                for _ in range(max(0, engine.restarts - last)):
                    times.append(now)
                while times and times[0] <= now - self.window_s:
                    times.popleft()
                self._seen[key] = (engine.restarts, times)
        for key in [k for k in self._seen if k not in present]:
            del self._seen[key]  # stopped or moved: a new copy starts counting afresh

    def to_move(self, registry: FleetRegistry, now: float) -> list[tuple[str, str]]:
        """(node, engine) pairs looping where another healthy live node could take the engine."""
        healthy = {n.node_id for n in registry.live_nodes() if n.healthy}
        out = []
        for (node_id, engine_id), (_, times) in sorted(self._seen.items()):
            recent = [t for t in times if t > now - self.window_s]
            if len(recent) >= self.limit and healthy - {node_id} - self.avoided(engine_id, now):
                out.append((node_id, engine_id))
        return out

    def moved(self, node_id: str, engine_id: str, now: float) -> None:
        """The engine was stopped on ``node_id`` for looping: place it elsewhere for a while."""
        self._avoid.setdefault(engine_id, {})[node_id] = now + self.window_s
        self._seen.pop((node_id, engine_id), None)

    def avoided(self, engine_id: str, now: float) -> frozenset[str]:
        """The nodes ``engine_id`` should not be placed on now."""
        nodes = self._avoid.get(engine_id, {})
        for node_id in [n for n, until in nodes.items() if until <= now]:
            del nodes[node_id]
        return frozenset(nodes)


__all__ = ["CrashLoops"]
