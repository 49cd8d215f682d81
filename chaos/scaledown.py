"""Scaling down under streaming load: ``scale-down``.

The scenario declares a deployment of its own through the admin API (``chaos-scale``: the
target model's source, 4 engines), waits until all 4 are ready, runs the load and long streams
against it, then cuts it to 2 engines (``PUT``) while the streams run. The 2 engines no longer
wanted leave routing at once and must finish their requests before they stop (or, past the
coordinator's ``--engine-drain-timeout``, hand their streams to the remaining ones through
mid-stream resume): nothing failed, lost or broken. The deployment is deleted afterwards.

The engines left can carry the load: 2 engines have 16 slots at the chaos fleet's 8 per
engine, enough for the 8 workers and the 8 long streams. Cut to 1, the load no longer fit its
8 slots: requests queued until, on a busy machine, the admission shed one whose deadline the
queue would miss (503; CI, 1 of 72). That is the overload scenario's subject, not this one's.

Figures: the load's counts (long streams included), ``streams_on_removed`` (long streams the
removed engines were serving when the cut came), ``drained_s`` (cut → the removed engines gone),
``streams_resumed``, and the check that the removed engines stopped. Needs the admin API (a
fleet with ``--admin-key`` answers 401: the scenario says so).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .engine_faults import LongStreams, _coordinator
from .errors import ChaosError
from .load import background, run_clock
from .outcomes import figures, since
from .scenarios import ChaosConfig, Figures, load_spec
from .target import Target

NAME = "chaos-scale"
FROM, TO = 4, 2
READY_TIMEOUT_S = 120.0
GONE_TIMEOUT_S = 120.0  # the coordinator's drain timeout (30 s by default) and a stop


def _doc(source: str, replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": "fleet.dev/v1alpha1",
        "kind": "FleetModel",
        "metadata": {"name": NAME},
        "spec": {"servedModelNames": [NAME], "source": source, "replicas": replicas},
    }


async def _admin(target: Target, method: str, path: str, body: Any = None) -> None:
    response = await target.http.request(method, target.url + path, json=body)
    if response.status_code >= 300:
        raise ChaosError(f"{method} {path} answered {response.status_code}: {response.text[:300]}")


async def _until(done: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    with trio.move_on_after(timeout_s):
        while not await done():  # noqa: ASYNC110 (the fleet's API: nothing to wait on but it)
            await trio.sleep(0.2)
        return
    raise ChaosError(f"not within {timeout_s:g} s: {what}")


async def scale_down(target: Target, cfg: ChaosConfig) -> Figures:
    """Cut a deployment from 4 engines to 1 under streaming load (see the module docstring)."""
    listed = (await target.get("/admin/v1/deployments"))["deployments"]
    source = next((d["source"] for d in listed if target.model in d["servedModelNames"]), None)
    if source is None:
        raise ChaosError(f"no deployment serves {target.model}: its source is unknown")
    scaled = dataclasses.replace(target, model=NAME)
    removed = {f"{NAME}-{i}" for i in range(TO, FROM)}
    await _admin(target, "POST", "/admin/v1/deployments", _doc(source, FROM))
    try:

        async def all_ready() -> bool:
            engines = await scaled.engines()
            return len(engines) == FROM and all(e["state"] == "ready" for e in engines)

        await _until(all_ready, READY_TIMEOUT_S, f"{FROM} engines of {NAME} ready")
        clock = run_clock()
        before = await target.metrics()
        async with background(target.url, load_spec(scaled, cfg, "scale-down"), clock) as load:
            await trio.sleep(cfg.warmup_s)
            streams = LongStreams(load, 2 * FROM)
            async with trio.open_nursery() as outer:
                await outer.start(streams.run)
                on_removed = sum(streams.on_engine.get(e, 0) for e in removed)
                cut_t = clock()
                await _admin(target, "PUT", f"/admin/v1/deployments/{NAME}", _doc(source, TO))

                async def gone() -> bool:
                    return not removed & {e["id"] for e in await scaled.engines()}

                await _until(gone, GONE_TIMEOUT_S, f"the engines scaled down ({sorted(removed)})")
                gone_t = clock()
            await trio.sleep(cfg.tail_s)
        after = await target.metrics()
    finally:
        await _admin(target, "DELETE", f"/admin/v1/deployments/{NAME}")
    background_only = figures(load.records)
    out = figures(load.records + streams.records)
    out.update(p50_ms=background_only["p50_ms"], p99_ms=background_only["p99_ms"])
    return {
        **out,
        "scaled": f"{FROM} -> {TO}",
        "long_streams": streams.count,
        "streams_on_removed": on_removed,
        "drained_s": since(gone_t, cut_t),
        **_coordinator(before, after),
        "checks": {"the removed engines met streams": on_removed > 0},
    }


__all__ = ["scale_down"]
