"""``kv-events``: KV batches lost and duplicated on the way to the index; is it right after?

Each engine's own view (the simulator's ``GET /sim/cache``: the hashes of every block it can
hit now, as its KV events name them) is compared with the coordinator's
(``GET /api/v1/cache/pod/{id}``: ``engine_block_hashes``). Per engine, ``missing`` are blocks the
engine holds and the index does not know (routing under-uses the cache), ``stale`` blocks the
index lists and the engine no longer holds (routing is misled).

Three phases, each a closed-loop load of shared-prefix prompts:

1. control: no fault; the comparison at rest shows what the index gets wrong on its own;
2. faults: every engine drops ``kv_fault_fraction`` of its KV batches and duplicates that share
   of the rest (the agent's relay repairs gaps from the engine's replay socket, which delivers
   the lost batches late, out of their order); then the faults are healed and the comparison is
   made at rest (``idle``, right away), then again until it holds with no new event
   (``recover_s``: the relay's tail probe fetches batches lost last, which no later batch
   revealed);
3. flush: one request straight to each engine (new batches), then the comparison until it holds
   or ``recover_timeout_s`` passes.
"""

from __future__ import annotations

from typing import Any

import httpx
import trio

from .errors import ChaosError
from .load import Load, client, run_clock
from .outcomes import figures
from .scenarios import ChaosConfig, Figures, load_spec
from .target import Target, deltas, scrape

INDEX_COUNTERS = ("fleet_kv_index_outcomes_total",)
AGENT_COUNTERS = (
    "fleet_agent_kv_gaps_total",
    "fleet_agent_kv_replays_total",
    "fleet_agent_kv_replayed_batches_total",
    "fleet_agent_kv_resyncs_total",
    "fleet_agent_kv_duplicates_total",
    "fleet_agent_kv_rejected_total",
)
REST_S = 0.5  # after the load stops, events of the last steps are still on their way


async def compare(target: Target, engines: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per engine: ``held`` (by the engine), ``indexed``, ``missing`` and ``stale`` blocks.

    Raises:
        ChaosError: an engine without ``/sim/cache`` (kv-events needs simulated engines).
    """
    out = {}
    for engine in engines:
        try:
            response = await target.http.get(engine["url"] + "/sim/cache", timeout=10)
        except httpx.HTTPError as exc:
            raise ChaosError(f"engine {engine['id']} unreachable: {exc}") from exc
        if response.status_code != 200:
            raise ChaosError(
                f"engine {engine['id']} has no /sim/cache ({response.status_code}): "
                "kv-events needs simulated engines (fleet up --engine sim)"
            )
        held = set(response.json()["block_hashes"])
        pod = await target.http.get(f"{target.url}/api/v1/cache/pod/{engine['id']}", timeout=10)
        if pod.status_code == 404:
            indexed: set[str] = set()
        elif pod.status_code == 200:
            indexed = set(pod.json()["engine_block_hashes"])
        else:
            raise ChaosError(f"cache/pod/{engine['id']} answered {pod.status_code}")
        out[engine["id"]] = {
            "held": len(held),
            "indexed": len(indexed),
            "missing": len(held - indexed),
            "stale": len(indexed - held),
        }
    return out


def _wrong(view: dict[str, dict[str, int]]) -> dict[str, int]:
    return {
        "missing": sum(v["missing"] for v in view.values()),
        "stale": sum(v["stale"] for v in view.values()),
        "engines_wrong": sum(bool(v["missing"] or v["stale"]) for v in view.values()),
        "held": sum(v["held"] for v in view.values()),
    }


async def _set_faults(http: httpx.AsyncClient, engines: list[dict[str, Any]], p: float) -> None:
    body = {"kv_drop_fraction": p, "kv_duplicate_fraction": p}
    for engine in engines:
        try:
            r = await http.post(engine["url"] + "/sim/faults", json=body, timeout=10)
        except httpx.HTTPError as exc:
            raise ChaosError(f"engine {engine['id']} unreachable: {exc}") from exc
        if r.status_code != 200:
            raise ChaosError(f"engine {engine['id']} refused faults: {r.status_code} {r.text}")


async def _phase(target: Target, cfg: ChaosConfig, tag: str) -> Load:
    spec = load_spec(target, cfg, tag, prefixes=16, prefix_words=96)
    async with client(target.url, spec) as http:
        load = Load(http, spec, run_clock(), limit=cfg.kv_requests)
        await load.run()
    return load


async def _agent_metrics(target: Target) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for node in (await target.get("/api/v1/nodes"))["nodes"]:
        if not node["lost"] and node.get("agent_url"):
            out.extend(await scrape(target.http, node["agent_url"] + "/metrics"))
    return out


async def kv_events(target: Target, cfg: ChaosConfig) -> Figures:
    """Run the three phases (see the module docstring)."""
    engines = await target.settle()
    control = await _phase(target, cfg, "kv-control")
    await trio.sleep(REST_S)
    baseline = _wrong(await compare(target, engines))
    coord_before, agent_before = await target.metrics(), await _agent_metrics(target)
    clock = run_clock()
    try:
        await _set_faults(target.http, engines, cfg.kv_fault_fraction)
        faulty = await _phase(target, cfg, "kv-faults")
    finally:
        await _set_faults(target.http, engines, 0.0)
    heal_t = clock()
    await trio.sleep(REST_S)
    idle = _wrong(await compare(target, engines))
    # At rest, with no new event: the relay's tail probe fetches batches lost last.
    settled_t: float | None = None
    with trio.move_on_after(cfg.recover_timeout_s):
        while _wrong(await compare(target, engines))["engines_wrong"]:  # noqa: ASYNC110 - polls HTTP
            await trio.sleep(0.2)
        settled_t = clock()
    flushed_t: float | None = None
    final: dict[str, int] = {}
    for engine in engines:
        await _flush(target, engine)
    with trio.move_on_after(cfg.recover_timeout_s):
        while True:
            final = _wrong(await compare(target, engines))
            if not final["engines_wrong"]:
                flushed_t = clock()
                break
            await trio.sleep(0.2)
    coord_after, agent_after = await target.metrics(), await _agent_metrics(target)
    records = control.records + faulty.records
    return {
        **figures(records),
        "detect_s": None,
        "recover_s": None if settled_t is None else round(settled_t - heal_t, 3),
        "blocks_held": final.get("held"),
        "control_missing": baseline["missing"],
        "control_stale": baseline["stale"],
        "idle_missing": idle["missing"],
        "idle_stale": idle["stale"],
        "final_missing": final.get("missing"),
        "final_stale": final.get("stale"),
        "index": deltas(coord_before, coord_after, INDEX_COUNTERS),
        "relay": _summed(deltas(agent_before, agent_after, AGENT_COUNTERS)),
        "checks": {
            "index == engine caches at rest, no fault": not baseline["engines_wrong"],
            "index == engine caches at rest after healing": settled_t is not None,
            "index == engine caches after healing and a flush": flushed_t is not None,
        },
    }


async def _flush(target: Target, engine: dict[str, Any]) -> None:
    """One completion straight to the engine: its next KV batch shows any gap before it."""
    prompt = f"flush {engine['id']} " + "block " * 40
    body = {"model": target.model, "prompt": prompt, "max_tokens": 1}
    try:
        r = await target.http.post(engine["url"] + "/v1/completions", json=body, timeout=30)
    except httpx.HTTPError as exc:
        raise ChaosError(f"engine {engine['id']} unreachable: {exc}") from exc
    if r.status_code != 200:
        raise ChaosError(f"flush request to {engine['id']} answered {r.status_code}")


def _summed(per_engine: dict[str, float]) -> dict[str, float]:
    """Per-engine counters summed by name."""
    out: dict[str, float] = {}
    for key, value in per_engine.items():
        name = key.split("{", 1)[0]
        out[name] = out.get(name, 0.0) + value
    return out


__all__ = ["compare", "kv_events"]
