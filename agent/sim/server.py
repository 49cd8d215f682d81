"""One simulated engine as a service: HTTP server, engine loop and KV publisher in one nursery.

:class:`SimServer` owns, for as long as :meth:`SimServer.run` runs: the ZMQ context and the KV
publisher's sockets (PUB, and the replay ROUTER when configured), the engine loop
(:class:`~fleet.agent.sim.engine.SimEngine`), the replay task and the hypercorn server. ``run``
reports ``started(url)`` once the HTTP port listens, so a caller (or the agent's supervisor,
through ``/health``) knows it is ready. It stops on cancellation: hypercorn gets ``grace_s`` to
finish open responses, then the sockets are closed with linger 0.

Memory: quart-trio and hypercorn, like the rest of Fleet. Importing them costs about 18 MB over
bare trio (48 vs 30 MB); a whole idle simulator measures 58 MB RSS, 40 MB PSS, and 64 of them
3.7 GB RSS (2.6 GB PSS) on a 24 GB machine (agent/sim/README.md), so a leaner trio + h11 server
was not worth a second HTTP stack.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from typing import Any

import trio
import zmq
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from fleet.protocol import http11
from fleet.protocol.vllm_tokenizer import VllmTokenizer

from .api import ApiDeps, create_app
from .cache import PrefixCache
from .config import VLLM_VERSION, SimConfig
from .engine import SimEngine
from .metrics import SimMetrics
from .publisher import KVEventPublisher
from .requests import RequestParser
from .scheduler import Scheduler

log = logging.getLogger(__name__)


def system_fingerprint(cfg: SimConfig) -> str:
    """vLLM's ``system_fingerprint`` ("full" mode): version, parallelism, a config hash."""
    parts = [f"vllm-{VLLM_VERSION}"]
    if cfg.tensor_parallel_size > 1:
        parts.append(f"tp{cfg.tensor_parallel_size}")
    key = repr((str(cfg.model_path), cfg.max_model_len, cfg.block_size, cfg.num_blocks))
    parts.append(hashlib.sha256(key.encode()).hexdigest()[:8])
    return "-".join(parts)


class SimServer:
    """A simulated vLLM engine.

    Args:
        cfg: the validated configuration.
        grace_s: how long open responses may take to finish on shutdown.
        tokenizer: the model's tokenizer (loaded from ``cfg.model_path`` when None).
    """

    def __init__(
        self, cfg: SimConfig, *, grace_s: float = 2.0, tokenizer: VllmTokenizer | None = None
    ) -> None:
        self.cfg = cfg
        self.grace_s = grace_s
        self.tokenizer = tokenizer or VllmTokenizer(cfg.model_path)
        cache = PrefixCache(
            block_size=cfg.block_size,
            num_blocks=cfg.num_blocks,
            hash_seed=cfg.hash_seed,
            enable_caching=cfg.enable_prefix_caching,
            events_enabled=cfg.kv_events.enabled,
        )
        scheduler = Scheduler(
            cache,
            cfg.latency,
            max_num_seqs=cfg.max_num_seqs,
            max_batched_tokens=cfg.max_batched_tokens,
        )
        self.metrics = SimMetrics(cfg)
        self.engine = SimEngine(
            scheduler,
            metrics=self.metrics,
            faults=cfg.faults,
            vocabulary=self.tokenizer.sample_ids,
            seed=cfg.seed,
        )
        self.publisher: KVEventPublisher | None = None
        self.url = ""

    def kv_sources(self) -> dict[str, Any]:
        """``/kv_event_sources``: rank 0's publisher config with its real endpoints."""
        if self.publisher is None:
            return {}
        settings = self.cfg.kv_events.as_json()
        settings["endpoint"] = self.publisher.endpoint
        settings["replay_endpoint"] = self.publisher.replay_endpoint
        return {"0": settings}

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``started(url)`` once the HTTP port listens."""
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            if self.cfg.kv_events.enabled:
                self.publisher = KVEventPublisher(
                    ctx,
                    self.cfg.kv_events,
                    faults=lambda: self.engine.faults,
                    rng=self.engine.rng,
                    clock=time.time,
                )
                self.publisher.open()
                self.engine.publisher = self.publisher
            deps = ApiDeps(
                cfg=self.cfg,
                engine=self.engine,
                parser=RequestParser(
                    self.tokenizer, self.cfg.served_model_names, self.cfg.max_model_len
                ),
                tokenizer=self.tokenizer,
                metrics=self.metrics,
                fingerprint=system_fingerprint(self.cfg),
                kv_sources=self.kv_sources,
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(self.engine.run)
                if self.publisher is not None:
                    await nursery.start(self.publisher.serve_replay)
                http11.install()  # HTTP/1.1 only, as vLLM's uvicorn
                binds = await nursery.start(
                    functools.partial(serve, create_app(deps), self._hypercorn_config())
                )
                self.url = str(binds[0]).replace("0.0.0.0", "127.0.0.1")
                task_status.started(self.url)
        finally:
            if self.publisher is not None:
                self.publisher.close()
            ctx.term()

    def _hypercorn_config(self) -> HypercornConfig:
        config = HypercornConfig()
        host = self.cfg.host
        host = f"[{host}]" if ":" in host else host
        config.bind = [f"{host}:{self.cfg.port}"]
        config.graceful_timeout = self.grace_s
        config.accesslog = None
        config.errorlog = logging.getLogger("fleet.agent.sim.http")
        config.keep_alive_timeout = 75
        return config


__all__ = ["SimServer", "system_fingerprint"]
