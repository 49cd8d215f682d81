"""The coordinator's HTTP front door: OpenAI-compatible API plus admin and health routes.

The inference endpoints are served by the front server (:mod:`.fastserve`) and reach this app
only on a connection handed to hypercorn; both use :mod:`.fastroutes`. Every error, whoever
raises it, leaves through :func:`fleet.coordinator.errors.render`, so the body is OpenAI's
``{"error": {...}}`` with the right status.
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from . import adminapi, prestage, routeapi
from .errors import ApiError, PayloadTooLarge, error_body
from .fastroutes import (
    ENDPOINTS,
    GuardedStream,
    authorize,
    error_reply,
    inference,
    internal_error,
)

if TYPE_CHECKING:
    from .apiports import ApiPorts

log = logging.getLogger(__name__)


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, content_type="application/json")


def create_app(coord: ApiPorts) -> QuartTrio:
    """Build the ASGI app for a coordinator."""
    app = QuartTrio("fleet.coordinator")
    app.config["MAX_CONTENT_LENGTH"] = coord.cfg.max_body_bytes
    app.config["RESPONSE_TIMEOUT"] = None  # streams last as long as generation does
    app.config["BODY_TIMEOUT"] = coord.cfg.body_timeout_s
    routing = routeapi.RoutingPorts(
        engines_for=coord.engines_for,
        scheduler=coord.scheduler,
        index=coord.kvindex,
        tokenizer=coord.prompt_tokenizer,
        inflight=coord.inference_ports.gateway.inflight.get,
    )

    @app.errorhandler(ApiError)
    async def _api_error(err: ApiError) -> Response:
        body, status, headers = error_reply(coord.metrics, err)
        return Response(body, status=status, headers=headers)

    @app.errorhandler(HTTPException)
    async def _http_error(err: HTTPException) -> Response:
        status = err.code or 500
        if status == 413:
            # The rest of the body is still in flight and will not be read: close the
            # connection, or the next request on it would be parsed out of that body.
            response = await _api_error(PayloadTooLarge(coord.cfg.max_body_bytes))
            response.headers["connection"] = "close"
            return response
        kind = "invalid_request_error" if status < 500 else "server_error"
        coord.metrics.request_errors.labels(reason=str(status)).inc()
        return Response(
            error_body(err.description or err.name, type=kind, code=status),
            status=status,
            content_type="application/json",
        )

    @app.errorhandler(Exception)
    async def _unexpected(err: Exception) -> Response:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        body, status, headers = internal_error(coord.metrics)
        return Response(body, status=status, headers=headers)

    async def _body() -> bytes:
        raw = await request.get_data(cache=False, as_text=False)
        assert isinstance(raw, bytes)
        return raw

    async def _inference(path: str) -> Response:
        # Served here only on a connection hypercorn serves (the front server hands a
        # connection over at its first request to another route); see fastroutes.py.
        headers = {k.lower(): v for k, v in request.headers.items()}
        reply = await inference(coord.inference_ports, path, headers, _body)
        if reply.stream is None:
            return Response(reply.body, status=reply.status, headers=reply.headers)
        stream = GuardedStream(reply.stream, reply.discard)
        response = Response(stream, status=reply.status, headers=reply.headers)
        response.timeout = None
        return response

    @app.post("/v1/completions")
    async def completions() -> Response:
        return await _inference("/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        return await _inference("/v1/chat/completions")

    @app.get("/v1/models")
    async def models() -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        await authorize(coord.inference_ports, headers, spend=False)
        created = int(coord.started_at)
        data = []
        for model in coord.served_models():
            deployment = coord.placer.deployment(model)
            entry: dict[str, Any] = {
                "id": model,
                "object": "model",
                "created": created,
                "owned_by": "fleet",
                "root": deployment.model_path if deployment else model,
                "parent": None,
            }
            if deployment is not None:
                entry["max_model_len"] = deployment.max_model_len
            data.append(entry)
        return _json({"object": "list", "data": data})

    @app.get("/healthz")
    async def healthz() -> Response:
        # Which process answered: a hot restart runs one coordinator after another.
        return _json(
            {
                "status": "ok",
                "pid": os.getpid(),
                "coordinator": coord.cfg.coordinator_id,
                "leader": coord.leadership.leader,
            }
        )

    @app.get("/readyz")
    async def readyz() -> Response:
        live = set(coord.registry.models())
        missing = [d.model for d in coord.placer.deployments if d.replicas and d.model not in live]
        served = coord.served_models()  # no API key needed: what `fleet up` waits for
        if missing:
            body = {"status": "not ready", "models_without_engines": missing, "models": served}
            return _json(body, 503)
        return _json({"status": "ready", "models": served})

    @app.get("/metrics")
    async def metrics() -> Response:
        coord.refresh_gauges()
        return Response(coord.metrics.render(), content_type="text/plain; version=0.0.4")

    @app.get("/api/v1/engines")
    async def engines() -> Response:
        return _json({"engines": [e.as_json() for e in coord.registry.engines()]})

    @app.get("/api/v1/nodes")
    async def nodes() -> Response:
        now = coord.link.clock()
        return _json(
            {
                # heartbeat_age_s: seconds since the node's last register or heartbeat
                "nodes": [
                    n.as_json() | {"heartbeat_age_s": round(now - n.last_seen, 3)}
                    for n in coord.registry.nodes()
                ],
                "agent_endpoint": coord.link.bound_endpoint,
                # The link's CURVE public key ("" when plaintext): public, it lets no one in.
                "agent_curve_key": coord.link.curve_key,
            }
        )

    @app.get("/api/v1/cache/state")
    async def cache_state() -> Response:
        _admin()
        index = coord.kvindex
        pods = []
        for engine_id in index.engine_ids():
            entry = index.engine(engine_id)
            assert entry is not None
            pods.append(
                {
                    "engine_id": engine_id,
                    "model": entry.model,
                    "blocks": len(entry.blocks),
                    "events": entry.events,
                    "batches": entry.batches,
                }
            )
        return _json(
            {
                "blocks": index.block_count(),
                "entries": index.entries,
                "max_entries": index.max_entries,
                "engines": pods,
                "stats": dict(index.stats),
            }
        )

    def _admin() -> dict[str, str]:
        headers = {k.lower(): v for k, v in request.headers.items()}
        adminapi.authorize(coord, headers)
        return headers

    async def _admin_body() -> bytes:
        """The request's body, once its admin key is checked."""
        _admin()
        raw = await request.get_data(cache=False, as_text=False)
        assert isinstance(raw, bytes)
        return raw

    @app.get("/admin/v1/deployments")
    async def deployments_list() -> Response:
        _admin()
        return _json(adminapi.listing(coord))

    @app.post("/admin/v1/deployments")
    async def deployments_create() -> Response:
        raw = await _admin_body()
        return _json(*await adminapi.put(coord, raw, None))

    @app.get("/admin/v1/deployments/<name>")
    async def deployments_get(name: str) -> Response:
        _admin()
        return _json(adminapi.one(coord, name))

    @app.put("/admin/v1/deployments/<name>")
    async def deployments_put(name: str) -> Response:
        raw = await _admin_body()
        return _json(*await adminapi.put(coord, raw, name))

    @app.delete("/admin/v1/deployments/<name>")
    async def deployments_delete(name: str) -> Response:
        _admin()
        return _json(await adminapi.delete(coord, name))

    @app.get("/admin/v1/prestage")
    async def prestage_list() -> Response:
        _admin()
        return _json(prestage.listing(coord))

    @app.post("/admin/v1/prestage")
    async def prestage_post() -> Response:
        raw = await _admin_body()
        return _json(*prestage.post(coord, raw))

    @app.post("/api/v1/route/explain")
    async def route_explain() -> Response:
        raw = await _admin_body()
        return _json(await routeapi.explain(routing, raw))

    @app.post("/api/v1/score")
    async def kv_score() -> Response:
        raw = await _admin_body()
        return _json(await routeapi.score(routing, raw))

    @app.get("/api/v1/cache/pod/<engine_id>")
    async def cache_pod(engine_id: str) -> Response:
        _admin()
        entry = coord.kvindex.engine(engine_id)
        if entry is None:
            raise ApiError(
                f"No KV events seen from engine `{engine_id}`.",
                status=404,
                param="engine_id",
                code="engine_not_found",
            )
        keys = sorted(coord.kvindex.engine_keys(engine_id))
        return _json(
            {
                "engine_id": engine_id,
                "model": entry.model,
                "blocks": len(keys),
                "events": entry.events,
                "batches": entry.batches,
                "block_keys": [f"{k:016x}" for k in keys],
                # the engine's own hashes, as its KV events name them (chaos compares them)
                "engine_block_hashes": sorted(
                    f"{h:016x}" if isinstance(h, int) else h.hex() for h in entry.blocks
                ),
            }
        )

    return app


__all__ = ["ENDPOINTS", "create_app"]
