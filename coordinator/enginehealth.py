"""Engine health: the one owner of what the coordinator knows about each engine's state. Sans-I/O.

It holds, per engine: its circuit breaker (:class:`.resilience.Breakers`), when it last sent a
byte (or was given work while idle), when a health probe last found it alive, and the process
seen under its id (a new one starts with a closed breaker). Both the request path (first tries,
resumes) and the watcher that probes busy engines read and update it here, so there is one stall
detector. :meth:`EngineHealth.sweep` applies both silence rules to engines with requests in
flight::

    silent ≥ probe_after_s (since its last byte or its last passed probe)  → probe its /health
    silent ≥ stall_s, a stream in flight (since its last byte; probes do not count)  → stalled

The stall rule finds an engine whose ``/health`` stays 200 while its core makes nothing (vLLM's
engine core hung). It waits for a stream: a non-streamed answer comes whole at its end, so an
engine busy with long non-streamed requests is silent for as long as they take.

A probe that fails while requests are in flight, a stall and a refused connection put the engine
*down* (:meth:`EngineHealth.down`): its breaker opens at once and ``on_down`` is told, so the
I/O layer can end every wait on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from .resilience import Breaker, Breakers, ResilienceConfig


class Identified(Protocol):
    """An engine, as far as routing decisions go."""

    @property
    def id(self) -> str: ...


E = TypeVar("E", bound=Identified)


class Process(Protocol):
    """What :meth:`EngineHealth.incarnations` reads of an engine."""

    @property
    def id(self) -> str: ...
    @property
    def url(self) -> str: ...
    @property
    def pid(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Sweep:
    """What :meth:`EngineHealth.sweep` found: engines to probe now, engines stalled (each
    already put down)."""

    probe: list[str]
    stalled: list[str]


def _ignore(engine_id: str, why: str) -> None:
    return None


class EngineHealth:
    """Breakers, progress, probes and incarnations of every engine.

    Args:
        cfg: breaker, probe and stall settings.
        inflight: requests in flight on an engine (silence without one is no stall).
        streaming: streamed requests in flight on an engine (the stall rule needs one).
        on_down: told ``(engine id, why)`` when an engine is put down (the I/O layer cancels
            what waits on it).

    Attributes:
        breakers: the circuit breakers and the ejection cap.
        progress: engine → when it last sent a byte (or got work while idle). The streaming
            path writes it per chunk, directly, to stay cheap.
    """

    def __init__(
        self,
        cfg: ResilienceConfig,
        inflight: Callable[[str], int],
        streaming: Callable[[str], int],
        on_down: Callable[[str, str], None] = _ignore,
    ) -> None:
        self.cfg = cfg
        self.breakers = Breakers(cfg)
        self.progress: dict[str, float] = {}
        self.on_down = on_down
        self._inflight = inflight
        self._streaming = streaming
        self._alive_at: dict[str, float] = {}  # engine -> when a probe last found it alive
        self._probing: set[str] = set()
        self._incarnation: dict[str, tuple[str, int]] = {}  # engine -> (url, pid) seen last

    def breaker(self, engine_id: str) -> Breaker:
        """The engine's breaker (created closed)."""
        return self.breakers.get(engine_id)

    def routable(self, engines: Sequence[E], now: float) -> list[E]:
        """The engines their breakers let through, within the ejection cap."""
        return self.breakers.routable(engines, [e.id for e in engines], now)

    def busy(self, engine_id: str, now: float, *, stream: bool = False) -> None:
        """The engine gets a request (``stream``: a streamed one): if it had none in flight
        (or no stream, for a stream), its silence so far was no stall: its clock starts now.
        Call before counting the request in flight."""
        if self._inflight(engine_id) == 0 or (stream and self._streaming(engine_id) == 0):
            self.progress[engine_id] = now

    def heard(self, engine_id: str, now: float) -> None:
        """The engine sent something (a response started, a chunk)."""
        self.progress[engine_id] = now

    def down(self, engine_id: str, now: float, why: str, *, refused: bool = False) -> None:
        """The engine is dead or hung: open its breaker now and tell ``on_down``.
        ``refused``: it refused a connection, so it is dead, not merely suspect (the
        ejection cap never lets it back in, :meth:`.Breakers.routable`)."""
        breaker = self.breakers.get(engine_id)
        if refused:
            breaker.refused(now)
        else:
            breaker.trip(now)
        self.progress[engine_id] = now  # its stall clock restarts: reported once per stall
        self.on_down(engine_id, why)

    def sweep(self, now: float) -> Sweep:
        """Apply the silence rules (module docstring) to the engines with requests in flight:
        the ones to probe now (each marked as being probed until :meth:`probed`), and the
        stalled ones, which are put down here."""
        cfg = self.cfg
        probe: list[str] = []
        stalled: list[str] = []
        for engine_id, at in self.progress.items():
            if self._inflight(engine_id) == 0:
                continue
            if now - at >= cfg.stall_s and self._streaming(engine_id) > 0:
                stalled.append(engine_id)
            elif engine_id not in self._probing:
                checked = max(at, self._alive_at.get(engine_id, -math.inf))
                if now - checked >= cfg.probe_after_s:
                    probe.append(engine_id)
        self._probing.update(probe)
        for engine_id in stalled:
            self.down(engine_id, now, "stalled: requests in flight, no output")
        return Sweep(probe, stalled)

    def probed(self, engine_id: str, ok: bool | None, now: float) -> bool:
        """A probe of ``engine_id`` ended: ``ok``, its ``/health`` answered 200 in time;
        False, it did not; None, the probe was abandoned (no verdict). True when the engine
        is put down (it failed with requests still in flight)."""
        self._probing.discard(engine_id)
        if ok is None:
            return False
        if ok:
            self._alive_at[engine_id] = now  # probe again later; the stall clock runs on
            return False
        if self._inflight(engine_id) == 0:
            return False
        self.down(engine_id, now, "health probe failed with requests in flight")
        return True

    def health_ok(self, engine_id: str, now: float) -> None:
        """The agent's active health check passed: an open breaker tries again sooner."""
        self.breakers.health_ok(engine_id, now)

    def incarnations(self, engines: Iterable[Process]) -> None:
        """A new process under an engine's id (restarted, or placed again on another node after
        its node was lost) starts with a closed breaker and a fresh clock: the old process's
        failures are not its own. ``engines``: the routable ones, as the agents report them."""
        for engine in engines:
            key = (engine.url, engine.pid)
            old = self._incarnation.get(engine.id)
            if old is not None and old != key:
                self.breakers.reset(engine.id)
                self.progress.pop(engine.id, None)
                self._alive_at.pop(engine.id, None)
            self._incarnation[engine.id] = key

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the state of engines that left (``keep``: the known ones)."""
        alive = set(keep)
        self.breakers.forget(list(alive))
        for table in (self._incarnation, self.progress, self._alive_at):
            for engine_id in [e for e in table if e not in alive]:
                del table[engine_id]


__all__ = ["EngineHealth", "Process", "Sweep"]
