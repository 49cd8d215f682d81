"""The agent's own HTTP API: health, metrics, its engines and GPUs, and fault injection into
fake GPUs. Errors are OpenAI-shaped JSON (``{"error": {"message", "type", "param", "code"}}``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import TYPE_CHECKING

from hypercorn.config import Config as HypercornConfig
from quart import Response, request
from quart_trio import QuartTrio

from .fakenvml import DEFAULT_FAULT_XID, FakeNvml

if TYPE_CHECKING:
    from .service import Agent


def hypercorn_config(host: str, port: int) -> HypercornConfig:
    """The agent's HTTP server settings: bind ``host:port``, one second of grace, no access
    log."""
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.graceful_timeout = 1.0
    config.accesslog = None
    config.errorlog = logging.getLogger("fleet.agent.http")
    return config


def _json(data: object, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, content_type="application/json")


def _error(message: str, status: int, *, param: str | None = None, code: str) -> Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return _json(body, status)


def create_app(agent: Agent) -> QuartTrio:
    """``GET /healthz``, ``/metrics``, ``/api/v1/engines``, ``/api/v1/gpus``,
    ``/api/v1/models`` (the model store: ``models`` cached, ``fetches`` in flight); ``POST
    /api/v1/gpus/{index}/xid`` (body ``{"xid": N}``, default 79) injects an XID into a fake GPU:
    202, or 409 on real GPUs, 404 for an unknown index, 400 for a bad body."""
    app = QuartTrio("fleet.agent")

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json(
            {
                "status": "ok",
                "node": agent.cfg.node_id,
                "pid": os.getpid(),
                "coordinator": agent.coordinator_id or None,
            }
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(agent.metrics.render(), content_type="text/plain; version=0.0.4")

    @app.get("/api/v1/engines")
    async def engines() -> Response:
        statuses = agent.statuses()
        return _json({"engines": [s.__dict__ | {"gpus": list(s.gpus)} for s in statuses]})

    @app.get("/api/v1/gpus")
    async def gpus() -> Response:
        snapshot = agent.gpus.snapshot()
        return _json({"gpus": [g.__dict__ | {"xids": list(g.xids)} for g in snapshot]})

    @app.get("/api/v1/models")
    async def models() -> Response:
        cached, fetches = agent.model_store()
        return _json(
            {
                "models": [dataclasses.asdict(m) for m in cached],
                "fetches": [dataclasses.asdict(f) for f in fetches],
            }
        )

    @app.post("/api/v1/gpus/<int:index>/xid")
    async def inject_xid(index: int) -> Response:
        body = await request.get_json(force=True, silent=True) or {}
        xid = body.get("xid", DEFAULT_FAULT_XID) if isinstance(body, dict) else None
        if not isinstance(xid, int) or isinstance(xid, bool):
            return _error('The body must be {"xid": <integer>}.', 400, param="xid",
                          code="invalid_xid")  # fmt: skip
        fake = agent.nvml_module
        if not isinstance(fake, FakeNvml):
            return _error("Faults go to fake GPUs only (--fake-gpus).", 409, code="real_gpus")
        if not 0 <= index < fake.count:
            return _error(f"No GPU {index} on this node.", 404, param="index", code="no_gpu")
        fake.inject_xid(index, xid)
        return _json({"gpu": index, "xid": xid}, 202)

    return app


__all__ = ["create_app", "hypercorn_config"]
