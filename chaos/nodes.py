"""Node faults under load: ``agent-kill``.

The agent of the node serving most long streams is SIGKILLed (it must run on this machine: its
``/healthz`` names its pid). Its engines die with it (the agent's reaper kills their process
groups), so started streams are cut and resumed elsewhere, and requests routed to them fail over;
the coordinator loses the node after its missed heartbeats and places its engines on the other
nodes. A fleet with one node has nowhere to fail over to: the scenario needs two.

Figures as the engine scenarios (:mod:`.engine_faults`), for the watched engine (the one serving
most long streams): ``detect_s`` (kill → it leaves routing), ``ready_s`` (→ ready again on
another node), ``recover_s`` (→ a request sent after the kill served by it), plus ``node``,
``new_node`` and ``engines_gone`` (the killed node's engines, none of them left running).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import trio

from .engine_faults import (
    LongStreams,
    _coordinator,
    _figures,
    _served_after,
    kill_and_watch,
    victim,
)
from .errors import ChaosError
from .load import background, run_clock
from .outcomes import since
from .scenarios import ChaosConfig, Figures, load_spec
from .target import Target, get_json


async def agent_kill(target: Target, cfg: ChaosConfig) -> Figures:
    """SIGKILL the agent of the node serving most long streams (see the module docstring)."""
    nodes = {n["id"]: n for n in (await target.get("/api/v1/nodes"))["nodes"]}
    live = [n for n in nodes.values() if not n["lost"]]
    if len(live) < 2:
        raise ChaosError(f"agent-kill needs two live nodes, the fleet has {len(live)}")
    clock = run_clock()
    before = await target.metrics()
    async with background(target.url, load_spec(target, cfg, "agent-kill"), clock) as load:
        await trio.sleep(cfg.warmup_s)
        streams = LongStreams(load, 2 * len(await target.engines()))
        async with trio.open_nursery() as outer:
            await outer.start(streams.run)
            engine = await victim(target, streams)
            engine_id, node_id = str(engine["id"]), str(engine["node"])
            doomed = {int(e["pid"]) for e in await target.engines() if e["node"] == node_id}
            agent_pid = await _agent_pid(target, nodes[node_id])
            fault_t, detect_t, ready_t = await kill_and_watch(
                target, load, engine_id, cfg, lambda: _kill_agent(agent_pid), doomed
            )
        await trio.sleep(cfg.tail_s)
    after = await target.metrics()
    moved = await target.engine(engine_id)
    left = sorted(pid for pid in doomed if alive(pid))
    return {
        **_figures(load, streams, engine_id),
        "detect_s": since(detect_t, fault_t),
        "recover_s": since(_served_after(load, engine_id, fault_t), fault_t),
        "ready_s": since(ready_t, fault_t),
        "node": node_id,
        "new_node": moved["node"] if moved else None,
        "engines_gone": not left,
        **_coordinator(before, after),
        "checks": {"the killed node's engine processes are gone": not left},
    }


async def _agent_pid(target: Target, node: dict[str, Any]) -> int:
    url = str(node.get("agent_url") or "")
    if not url:
        raise ChaosError(f"node {node['id']} reports no agent URL")
    health = await get_json(target.http, url + "/healthz")
    pid = health.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        raise ChaosError(f"agent of node {node['id']} reports no pid")
    return pid


def _kill_agent(pid: int) -> None:
    """SIGKILL a ``fleet agent`` process on this machine.

    Raises:
        ChaosError: no such process here, or not a Fleet agent.
    """
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError as exc:
        raise ChaosError(f"agent pid {pid} is not on this machine or gone: {exc}") from exc
    if "fleet" not in argv or "agent" not in argv:
        raise ChaosError(f"pid {pid} is not a Fleet agent: {argv[:120]!r}")
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError as exc:
        raise ChaosError(f"cannot SIGKILL agent pid {pid}: {exc}") from exc


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (exists and is not a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


__all__ = ["agent_kill", "alive"]
