"""The scenarios, by name, and the targets their figures must meet.

Each scenario injects one fault into a running fleet while load runs, heals it, and returns a
figures dict: ``scenario``, ``sent``, ``succeeded``, ``failed``, ``lost``, ``broken``,
``p50_ms``, ``p99_ms``, ``detect_s``, ``recover_s`` (None where they do not apply), plus its
own numbers. :func:`run` settles the fleet first (every engine ready), times the scenario and
adds ``missed``: the targets (:func:`missed`) its figures do not meet.

==================  ==========================================================================
engine-sigkill      SIGKILL the busiest engine under load; the agent restarts it
engine-hang         SIGSTOP the busiest engine under load past the requests' deadline, SIGCONT
agent-kill          SIGKILL the agent of the busiest node (two live nodes needed); its engines
                    die with it and are placed on the other node
kv-events           KV batches dropped and duplicated (sim faults) while shared-prefix prompts
                    flow; after healing, each engine's index entries must equal its cache
overload            measure capacity (closed loop), then a burst at 10× it
malformed-http      bad bodies, types, sizes, headers, slow and vanishing clients, beside load
malformed-wire      garbage and truncated frames to the agent link and to a KV relay
                    (a plaintext link)
rogue-agent         agents without the key try to register, heartbeat and send KV events
                    on the CURVE-protected link
response-cache-     stop the response cache's Redis under load (SIGSTOP), continue it: every
redis-down          request served, hits and Redis writes resume (a Redis cache needed)
==================  ==========================================================================
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from fleet.protocol.errors import ConfigError

from .errors import ChaosError
from .load import LoadSpec
from .target import Target

Figures = dict[str, Any]


@dataclass(frozen=True)
class ChaosConfig:
    """How hard and how long the scenarios push (seconds where named ``_s``).

    Attributes:
        concurrency: closed-loop workers of the background load.
        max_tokens: tokens each load request asks for.
        deadline_s: ``x-request-timeout`` of load requests.
        client_timeout_s: the load client's own limit (connect, each read).
        warmup_s: load before a fault.
        tail_s: load after recovery.
        detect_timeout_s: the longest a scenario waits for the fleet to notice a fault.
        recover_timeout_s: the longest it waits for recovery.
        kv_requests: requests of each kv-events phase.
        kv_fault_fraction: share of KV batches dropped, and of those left duplicated.
        capacity_s: the closed-loop capacity measurement of overload.
        capacity_concurrency: its workers.
        burst_factor: the burst's rate as a multiple of capacity.
        burst_s: how long the burst is offered.
        burst_new_connections: each burst request opens its connection as it leaves (clients
            arriving: the listen queue takes the burst) instead of beforehand.
        seed: seeds the request mix.

    Raises:
        ConfigError: a value out of range.
    """

    concurrency: int = 8
    max_tokens: int = 8
    deadline_s: float = 5.0
    client_timeout_s: float = 30.0
    warmup_s: float = 1.0
    tail_s: float = 1.0
    detect_timeout_s: float = 15.0
    recover_timeout_s: float = 30.0
    kv_requests: int = 200
    kv_fault_fraction: float = 0.3
    capacity_s: float = 3.0
    capacity_concurrency: int = 32
    burst_factor: float = 10.0
    burst_s: float = 2.0  # long enough to overflow slots + queue (shedding is exercised)
    burst_new_connections: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("concurrency", "max_tokens", "kv_requests", "capacity_concurrency"):
            if getattr(self, key) < 1:
                raise ConfigError(key, getattr(self, key), "must be >= 1")
        for key in (
            "deadline_s",
            "client_timeout_s",
            "detect_timeout_s",
            "recover_timeout_s",
            "capacity_s",
            "burst_s",
            "burst_factor",
        ):
            value = getattr(self, key)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(key, value, "must be a finite number > 0")
        for key in ("warmup_s", "tail_s"):
            if not getattr(self, key) >= 0:
                raise ConfigError(key, getattr(self, key), "must be >= 0")
        if not 0 <= self.kv_fault_fraction <= 1:
            raise ConfigError("kv_fault_fraction", self.kv_fault_fraction, "must be within 0..1")


def load_spec(target: Target, cfg: ChaosConfig, tag: str, **changes: Any) -> LoadSpec:
    """The background load of a scenario: ``cfg``'s settings, ``changes`` on top.

    Raises:
        ConfigError: a change out of range.
    """
    settings: dict[str, Any] = {
        "model": target.model,
        "concurrency": cfg.concurrency,
        "max_tokens": cfg.max_tokens,
        "deadline_s": cfg.deadline_s,
        "client_timeout_s": cfg.client_timeout_s,
        "seed": cfg.seed,
        "api_key": target.api_key,
        "tag": tag,
    }
    return LoadSpec(**{**settings, **changes})


ScenarioFn = Callable[[Target, ChaosConfig], Awaitable[Figures]]


@dataclass(frozen=True)
class Scenario:
    """A scenario: its name, one line on what it does, and how to run it.

    Attributes:
        name: what ``fleet chaos run`` takes.
        summary: one line.
        run: the coroutine function.
        overload: whether failures (503s) are the expected answer to part of its load.
        nodes: the live nodes it needs (run with no scenario named, ``fleet chaos run`` skips
            those a fleet has too few nodes for).
        coordinators: the coordinator processes on the one port it needs (skipped likewise).
        link: the agent link it needs, "plaintext" or "curve" ("": either; skipped likewise).
        cache: the response cache backend it needs, "redis" ("": none; skipped likewise).
    """

    name: str
    summary: str
    run: ScenarioFn
    overload: bool = False
    nodes: int = 1
    coordinators: int = 1
    link: str = ""
    cache: str = ""


def _registry() -> dict[str, Scenario]:
    from . import (
        cacheredis,
        coordinators,
        engine_faults,
        kvcheck,
        malformed_http,
        malformed_wire,
        nodes,
        overload,
        rogue_agent,
        scaledown,
    )

    scenarios = [
        Scenario(
            "engine-sigkill",
            "SIGKILL the busiest engine under load; the agent restarts it",
            engine_faults.engine_sigkill,
        ),
        Scenario(
            "engine-hang",
            "SIGSTOP the busiest engine under load past the deadline, then SIGCONT",
            engine_faults.engine_hang,
        ),
        Scenario(
            "agent-kill",
            "SIGKILL the agent of the busiest node: its engines die, its work moves",
            nodes.agent_kill,
            nodes=2,
        ),
        Scenario(
            "coordinator-kill",
            "SIGKILL the leading coordinator of several under load: the others serve and lead",
            coordinators.coordinator_kill,
            coordinators=2,
        ),
        Scenario(
            "kv-events",
            "drop and duplicate KV batches while shared prefixes flow; index == caches after",
            kvcheck.kv_events,
        ),
        Scenario(
            "overload",
            "measure capacity, then a burst at 10x it: 503 + Retry-After, goodput kept",
            overload.overload,
            overload=True,
        ),
        Scenario(
            "scale-down",
            "declare 4 engines, cut them to 1 under streaming load: nothing failed or cut",
            scaledown.scale_down,
        ),
        Scenario(
            "malformed-http",
            "bad bodies, types, sizes, headers, slow and vanishing clients beside good load",
            malformed_http.malformed_http,
        ),
        Scenario(
            "malformed-wire",
            "garbage and truncated frames to the agent link and a KV relay beside good load",
            malformed_wire.malformed_wire,
            link="plaintext",
        ),
        Scenario(
            "rogue-agent",
            "agents without the key try to register, heartbeat, send KV events: all refused",
            rogue_agent.rogue_agent,
            link="curve",
        ),
        Scenario(
            "response-cache-redis-down",
            "stop the response cache's Redis under load, continue it: all served, hits resume",
            cacheredis.response_cache_redis_down,
            cache="redis",
        ),
    ]
    return {s.name: s for s in scenarios}


def scenarios() -> dict[str, Scenario]:
    """Every scenario by name, in the order ``fleet chaos run`` runs them."""
    return _registry()


def missed(figures: Figures, *, overload: bool = False) -> list[str]:
    """The targets ``figures`` does not meet (empty: all met).

    Every scenario: nothing lost, nothing broken, and every extra check it reports in
    ``checks`` (a name → bool map) true. Every scenario but an overload: nothing failed (each
    leaves healthy engines to answer). An overload: every failure is a 503 with Retry-After,
    and goodput at least 90% of the measured capacity.
    """
    out = []
    if figures.get("lost", 0):
        out.append(f"lost == 0 (lost {figures['lost']})")
    if figures.get("broken", 0):
        out.append(f"broken == 0 (broken {figures['broken']})")
    if overload:
        if figures.get("failed", 0) != figures.get("rejected_503", 0):
            out.append(
                f"every failure a 503 ({figures.get('failed')} failed, "
                f"{figures.get('rejected_503')} were 503)"
            )
        if figures.get("rejected_503_no_retry_after", 0):
            lacking = figures["rejected_503_no_retry_after"]
            out.append(f"Retry-After on every 503 ({lacking} lack it)")
        ratio = figures.get("goodput_ratio")
        if ratio is None or ratio < 0.9:
            out.append(f"goodput >= 90% of capacity (got {ratio})")
    elif figures.get("failed", 0):
        out.append(f"failed == 0 (failed {figures['failed']})")
    for name, ok in figures.get("checks", {}).items():
        if not ok:
            out.append(name)
    return out


async def run(name: str, target: Target, cfg: ChaosConfig) -> Figures:
    """Settle the fleet, run scenario ``name``, add timing and missed targets.

    Raises:
        ChaosError: an unknown scenario, or a fleet that cannot be driven.
    """
    known = scenarios()
    scenario = known.get(name)
    if scenario is None:
        raise ChaosError(f"unknown scenario {name!r}; known: {', '.join(known)}")
    await target.settle()
    started = trio.current_time()
    figures = await scenario.run(target, cfg)
    figures = {"scenario": name, **figures}
    figures["duration_s"] = round(trio.current_time() - started, 2)
    figures["missed"] = missed(figures, overload=scenario.overload)
    return figures


__all__ = ["ChaosConfig", "Figures", "Scenario", "load_spec", "missed", "run", "scenarios"]
