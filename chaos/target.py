"""The fleet under test, seen from outside: its HTTP API, metrics and engine processes.

:class:`Target` is what every scenario gets: the coordinator's URL and a client, the model it
serves, and the agent-link endpoint. :class:`Watcher` samples one engine's registry state and
breaker a few times a second, so a scenario can say when the fleet noticed a fault and when it
recovered (:func:`fleet.chaos.outcomes.first_time`).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from .errors import ChaosError
from .outcomes import EngineSample, first_time

Metrics = list[tuple[str, dict[str, str], float]]


@dataclass(frozen=True)
class Target:
    """A running fleet.

    Attributes:
        url: the coordinator's base URL.
        http: a client for the coordinator's API (base URL set).
        model: the model the scenarios request.
        agent_endpoint: the coordinator's agent-link ZMQ endpoint (empty when not exposed).
        api_key: the key inference requests carry (empty: the API is open).
        agent_curve_key: the agent link's CURVE public key (empty: the link is plaintext).
    """

    url: str
    http: httpx.AsyncClient
    model: str
    agent_endpoint: str
    api_key: str = ""
    agent_curve_key: str = ""

    async def get(self, path: str) -> Any:
        """GET a coordinator path; its JSON.

        Raises:
            ChaosError: unreachable, or not a 200.
        """
        return await get_json(self.http, self.url + path)

    async def engines(self) -> list[dict[str, Any]]:
        """``/api/v1/engines``, this model's engines only."""
        data = await self.get("/api/v1/engines")
        return [e for e in data["engines"] if e["model"] == self.model]

    async def engine(self, engine_id: str) -> dict[str, Any] | None:
        return next((e for e in await self.engines() if e["id"] == engine_id), None)

    async def metrics(self) -> Metrics:
        """The coordinator's ``/metrics`` as (sample name, labels, value)."""
        return await scrape(self.http, self.url + "/metrics")

    async def settle(self, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Wait until every engine of the model is ready; return them.

        Raises:
            ChaosError: not all ready in time (the message lists their states).
        """
        engines: list[dict[str, Any]] = []
        with trio.move_on_after(timeout_s):
            while True:
                engines = await self.engines()
                if engines and all(e["state"] == "ready" for e in engines):
                    return engines
                await trio.sleep(0.2)
        states = {e["id"]: e["state"] for e in engines}
        raise ChaosError(f"engines not all ready within {timeout_s:g} s: {states}")


async def connect(
    url: str, http: httpx.AsyncClient, model: str | None = None, *, api_key: str = ""
) -> Target:
    """Find what a scenario needs of the fleet at ``url``.

    Args:
        url: the coordinator's base URL.
        http: a client to use for the coordinator's API.
        model: the model to load; default: the first one ``/v1/models`` lists.
        api_key: the API key of a fleet started with ``--api-keys``.

    Raises:
        ChaosError: the coordinator cannot be reached or serves no model.
    """
    url = url.rstrip("/")
    auth = {"authorization": f"Bearer {api_key}"} if api_key else {}
    models = [m["id"] for m in (await get_json(http, url + "/v1/models", auth))["data"]]
    if model is None:
        if not models:
            raise ChaosError(f"{url} serves no model (no ready engine)")
        model = models[0]
    nodes = await get_json(http, url + "/api/v1/nodes")
    endpoint = str(nodes.get("agent_endpoint", ""))
    host = urlsplit(url).hostname or "127.0.0.1"
    for wildcard in ("0.0.0.0", "*", "[::]"):
        endpoint = endpoint.replace(f"//{wildcard}:", f"//{host}:")
    curve = str(nodes.get("agent_curve_key") or "")
    return Target(url=url, http=http, model=model, agent_endpoint=endpoint, api_key=api_key,
                  agent_curve_key=curve)  # fmt: skip


async def get_json(http: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None) -> Any:
    """GET ``url``; its JSON.

    Raises:
        ChaosError: unreachable, or not a 200.
    """
    try:
        response = await http.get(url, timeout=10, headers=headers)
    except httpx.HTTPError as exc:
        raise ChaosError(f"cannot reach {url}: {type(exc).__name__}: {exc}") from exc
    if response.status_code != 200:
        raise ChaosError(f"{url} answered {response.status_code}: {response.text[:200]}")
    return response.json()


async def scrape(http: httpx.AsyncClient, url: str) -> Metrics:
    """A Prometheus endpoint's samples.

    Raises:
        ChaosError: unreachable, or not a 200.
    """
    try:
        response = await http.get(url, timeout=10)
    except httpx.HTTPError as exc:
        raise ChaosError(f"cannot reach {url}: {type(exc).__name__}: {exc}") from exc
    if response.status_code != 200:
        raise ChaosError(f"{url} answered {response.status_code}")
    return [
        (s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    ]


def total(metrics: Metrics, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        value
        for n, have, value in metrics
        if n == name and all(have.get(k) == v for k, v in labels.items())
    )


def by_label(metrics: Metrics, name: str, label: str) -> dict[str, float]:
    """``name``'s samples keyed by one label's value."""
    return {have.get(label, ""): value for n, have, value in metrics if n == name}


def deltas(before: Metrics, after: Metrics, names: tuple[str, ...]) -> dict[str, float]:
    """How much each sample of the counters ``names`` grew, keyed ``name{label=value,...}``
    (samples that did not grow are left out)."""
    old = {_key(n, labels): v for n, labels, v in before if n in names}
    out = {}
    for n, labels, value in after:
        if n in names:
            key = _key(n, labels)
            grew = value - old.get(key, 0.0)
            if grew:
                out[key] = grew
    return out


def _key(name: str, labels: dict[str, str]) -> str:
    inner = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}" if inner else name


# -- engine processes ----------------------------------------------------------------------

ENGINE_MARKERS = ("fleet.agent.sim", "vllm")


def signal_engine(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to an engine process on this machine.

    Raises:
        ChaosError: no such process, or it is not an engine (its command line names neither
            the simulator nor vLLM: a pid reused since the registry listed it).
    """
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError as exc:
        raise ChaosError(f"engine pid {pid} is not on this machine or gone: {exc}") from exc
    if not any(marker in argv for marker in ENGINE_MARKERS):
        raise ChaosError(f"pid {pid} is not an engine: {argv[:120]!r}")
    try:
        os.kill(pid, sig)
    except OSError as exc:
        raise ChaosError(f"cannot send {sig.name} to engine pid {pid}: {exc}") from exc


@contextlib.asynccontextmanager
async def stopped(pid: int) -> AsyncIterator[None]:
    """SIGSTOP an engine for the block; SIGCONT on the way out, whatever happened."""
    signal_engine(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ChaosError):  # it may have been killed meanwhile
            signal_engine(pid, signal.SIGCONT)


# -- watching one engine --------------------------------------------------------------------


class Watcher:
    """Samples one engine (registry state, pid, breaker) every ``interval_s``.

    Args:
        target: the fleet.
        engine_id: the engine to watch.
        clock: the run's clock.
        interval_s: time between samples.

    Resource handling: :meth:`run` samples until cancelled; it owns nothing else.
    """

    def __init__(
        self,
        target: Target,
        engine_id: str,
        clock: Callable[[], float],
        *,
        interval_s: float = 0.1,
    ) -> None:
        self.target = target
        self.engine_id = engine_id
        self.clock = clock
        self.interval_s = interval_s
        self.samples: list[EngineSample] = []
        self._new = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sample until cancelled; ``started()`` after the first sample."""
        await self._sample()
        task_status.started()
        while True:
            await trio.sleep(self.interval_s)
            await self._sample()

    async def _sample(self) -> None:
        t = self.clock()
        engine = await self.target.engine(self.engine_id)
        breakers = by_label(await self.target.metrics(), "fleet_breaker_state", "engine")
        self.samples.append(
            EngineSample(
                t=t,
                state=engine["state"] if engine else "absent",
                pid=int(engine["pid"] or 0) if engine else 0,
                breaker=int(breakers.get(self.engine_id, 0)),
            )
        )
        self._new.set()
        self._new = trio.Event()

    async def when(
        self, condition: Callable[[EngineSample], bool], timeout_s: float
    ) -> float | None:
        """Wait for the first sample meeting ``condition``; its time, or None if none came
        within ``timeout_s``."""
        with trio.move_on_after(timeout_s):
            while (found := first_time(self.samples, condition)) is None:
                await self._new.wait()
            return found
        return None


__all__ = [
    "Metrics",
    "Target",
    "Watcher",
    "by_label",
    "connect",
    "deltas",
    "get_json",
    "scrape",
    "signal_engine",
    "stopped",
    "total",
]
