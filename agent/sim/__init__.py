"""A simulated vLLM 0.32 engine: the same argv, HTTP API, metrics and KV-event stream, no model.

Run as ``python -m fleet.agent.sim`` with the flags Fleet's agent gives vLLM (plus ``--sim-*``);
the agent launches it for engines of kind ``sim``. One process per engine, about 60 MB each, so
64 fit on a small machine for scale, routing and chaos work.

Layers (sans-I/O cores first, thin trio around them):

* :mod:`.cache`: vLLM's paged prefix cache, block hashes and KV events.
* :mod:`.latency`, :mod:`.scheduler`: continuous batching, chunked prefill, preemption, step
  times.
* :mod:`.faults`: what can go wrong, validated.
* :mod:`.tokenizer`, :mod:`.schema`, :mod:`.requests`, :mod:`.responses`, :mod:`.errors`:
  vLLM's request handling and JSON, without transformers.
* :mod:`.metrics`: vLLM's Prometheus families.
* :mod:`.engine`, :mod:`.publisher`, :mod:`.api`, :mod:`.server`, :mod:`.cli`: the trio engine
  loop, the ZMQ publisher and replay socket, the quart app, the service, the process.
* :mod:`.fleet_of_sims`: start N simulators on one machine and measure them.
"""

from __future__ import annotations

from .cache import PrefixCache, external_hash, hash_block, none_hash
from .config import KVEventsSettings, SimConfig, parse_args
from .engine import RequestStream, SimEngine
from .faults import FaultState
from .latency import LatencyModel
from .scheduler import Scheduler, SimRequest, StepPlan, StepResult, TokenOutput
from .server import SimServer

__all__ = [
    "FaultState",
    "KVEventsSettings",
    "LatencyModel",
    "PrefixCache",
    "RequestStream",
    "Scheduler",
    "SimConfig",
    "SimEngine",
    "SimRequest",
    "SimServer",
    "StepPlan",
    "StepResult",
    "TokenOutput",
    "external_hash",
    "hash_block",
    "none_hash",
    "parse_args",
]
