"""The simulator's HTTP surface: vLLM 0.32's OpenAI server routes, plus ``/sim/faults``.

==============================  ============================================================
route                           answer
==============================  ============================================================
GET  /health                    200, empty body (also while the ``hang`` fault is on)
GET  /v1/models                 the served names
POST /v1/completions            plain JSON or SSE (``stream``, ``stream_options``)
POST /v1/chat/completions       idem; the prompt is the model's chat template, rendered
POST /v1/completions/render     vLLM's GenerateRequest list (403 without --enable-scale-out)
POST /v1/chat/completions/render  one GenerateRequest (idem)
POST /tokenize, /detokenize     vLLM's shapes
GET  /metrics                   vLLM's ``vllm:*`` families (:mod:`.metrics`)
GET  /version, /load            ``{"version": "0.32.0"}``, ``{"server_load": n}``
GET  /kv_event_sources          the KV publisher's endpoints, as vLLM reports them
POST /reset_prefix_cache        ``{"success": bool}`` (vLLM's dev-mode route)
GET  /sim/faults                the faults in force
GET  /sim/cache                 the prefix cache's hashes, as KV events publish them (chaos)
POST /sim/faults                change some of them: a JSON object of fault names to values
==============================  ============================================================

Every error leaves through :class:`~fleet.agent.sim.errors.SimApiError` (vLLM's body), except
unknown routes and methods, which get Starlette's ``{"detail": ...}`` as from vLLM.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from fleet.protocol.errors import ConfigError
from fleet.protocol.vllm_tokenizer import VllmTokenizer

from .config import VLLM_VERSION, SimConfig
from .engine import RequestStream, SimEngine
from .errors import SimApiError, bad_request, internal_error
from .kvtransfer import prefill_answer, wants_remote_decode, wants_remote_prefill
from .metrics import CONTENT_TYPE, SimMetrics
from .render import generate_request, scale_out_disabled
from .requests import GenerateParams, RequestKind, RequestParser, decode_body
from .responses import (
    SSE_DONE,
    chat_chunk,
    chat_response,
    chat_role_chunk,
    completion_chunk,
    completion_response,
    dumps,
    models_response,
    new_request_id,
    sse,
    usage_chunk,
)

log = logging.getLogger(__name__)

JSON = "application/json"
EVENT_STREAM = "text/event-stream; charset=utf-8"
CRASH_STATUS = 1


@dataclass(frozen=True)
class ApiDeps:
    """What the routes use.

    Attributes:
        cfg: the engine's configuration.
        engine: the engine core.
        parser: request checks for the served model.
        tokenizer: the model's tokenizer.
        metrics: the engine's metrics.
        fingerprint: the ``system_fingerprint`` of responses.
        kv_sources: returns ``/kv_event_sources``'s body.
    """

    cfg: SimConfig
    engine: SimEngine
    parser: RequestParser
    tokenizer: VllmTokenizer
    metrics: SimMetrics
    fingerprint: str
    kv_sources: Callable[[], dict[str, Any]]


def _json(data: Any, status: int = 200) -> Response:
    return Response(dumps(data), status=status, content_type=JSON)


class _Generation:
    """Turns one request's tokens into text deltas, watching for stop strings."""

    def __init__(self, deps: ApiDeps, params: GenerateParams, stream: RequestStream) -> None:
        self.deps = deps
        self.params = params
        self.stream = stream
        self.decoder = deps.tokenizer.decode_stream()
        self.text = ""
        self.count = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | None = None

    async def deltas(self) -> AsyncIterator[str]:
        """Yield each token's text; ``finish_reason`` is set when the last one is yielded."""
        tokenizer = self.deps.tokenizer.tokenizer
        async for output in self.stream.tokens:
            self.count += 1
            delta = self.decoder.step(tokenizer, output.token_id) or ""
            self.finish_reason = output.finish_reason
            if self.params.stop:
                delta = self._apply_stop(delta)
            self.text += delta
            yield delta
            if self.finish_reason is not None:
                return

    def _apply_stop(self, delta: str) -> str:
        combined = self.text + delta
        hits = [(combined.find(s), s) for s in self.params.stop if s and s in combined]
        if not hits:
            return delta
        index, stop = min(hits)
        self.finish_reason, self.stop_reason = "stop", stop
        self.deps.engine.abort(self.stream.request.request_id, "stop")
        return combined[:index][len(self.text) :]

    def close(self) -> None:
        """Take the request out of the engine if it has not finished (client gone)."""
        if self.finish_reason is None:
            self.deps.engine.abort(self.stream.request.request_id)


def create_app(deps: ApiDeps) -> QuartTrio:
    """Build the ASGI app of one simulated engine."""
    app = QuartTrio("fleet.agent.sim")
    app.config["MAX_CONTENT_LENGTH"] = None
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = 60
    cfg, engine, parser = deps.cfg, deps.engine, deps.parser
    in_flight = [0]

    @app.errorhandler(SimApiError)
    async def _api_error(err: SimApiError) -> Response:
        return Response(err.body(), status=err.status, content_type=JSON)

    @app.errorhandler(HTTPException)
    async def _http_error(err: HTTPException) -> Response:
        status = err.code or 500
        response = _json({"detail": err.name}, status)
        allowed: list[str] = list(getattr(err, "valid_methods", None) or ())
        if status == 405 and allowed:
            methods = [m for m in allowed if m not in ("HEAD", "OPTIONS")]
            response.headers["allow"] = ", ".join(methods)
        return response

    async def body() -> Any:
        raw = await request.get_data(cache=False, as_text=False)
        assert isinstance(raw, bytes)
        return decode_body(raw)

    async def generate(kind: RequestKind) -> Response:
        params = parser.generate(kind, await body())
        if engine.fails_request():
            raise internal_error("Simulated engine failure (fail_fraction fault).")
        request_id = new_request_id(kind, request.headers.get("X-Request-Id"))
        seed = params.seed if params.seed is not None else (0 if params.greedy else None)
        connector = cfg.kv_transfer if cfg.kv_transfer and cfg.kv_transfer.simulated else None
        kv_params = params.kv_transfer_params if connector else None  # vLLM: ignored
        sends = wants_remote_decode(kv_params)
        stream = engine.submit(
            params.prompt_tokens,
            params.max_tokens,
            sampling_seed=seed,
            remote_prefill=wants_remote_prefill(kv_params),
            keep_block_ids=sends,
        )
        generation = _Generation(deps, params, stream)
        if params.stream:
            response = Response(
                _sse_body(deps, params, generation, request_id, in_flight),
                content_type=EVENT_STREAM,
            )
            response.timeout = None
            return response
        in_flight[0] += 1
        try:
            async for _ in generation.deltas():
                pass
        finally:
            in_flight[0] -= 1
            generation.close()
        build = chat_response if kind == "chat" else completion_response
        answer = None
        if connector is not None and sends and generation.finish_reason in ("length", "stop"):
            done = stream.request
            answer = prefill_answer(
                connector,
                request_id,
                done.block_ids,
                done.num_computed,
                tp_size=cfg.tensor_parallel_size,
            )
        return _json(
            build(
                request_id=request_id,
                created=int(time.time()),
                model=params.model,
                text=generation.text,
                finish_reason=generation.finish_reason or "length",
                stop_reason=generation.stop_reason,
                prompt_tokens=len(params.prompt_tokens),
                completion_tokens=generation.count,
                fingerprint=deps.fingerprint,
                kv_transfer_params=answer,
            )
        )

    @app.post("/v1/completions")
    async def completions() -> Response:
        return await generate("completion")

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        return await generate("chat")

    async def render(kind: RequestKind) -> list[dict[str, Any]]:
        if not cfg.enable_scale_out:
            raise scale_out_disabled()
        raw = await body()
        rendered = parser.render(kind, raw)
        base = new_request_id(kind, request.headers.get("X-Request-Id"))
        return [
            generate_request(raw, params, base if len(rendered) == 1 else f"{base}-{i}")
            for i, params in enumerate(rendered)
        ]

    @app.post("/v1/completions/render")
    async def completions_render() -> Response:
        return _json(await render("completion"))

    @app.post("/v1/chat/completions/render")
    async def chat_completions_render() -> Response:
        return _json((await render("chat"))[0])

    @app.get("/v1/models")
    async def models() -> Response:
        return _json(
            models_response(
                names=cfg.served_model_names,
                root=str(cfg.model_path),
                max_model_len=cfg.max_model_len,
                created=int(time.time()),
            )
        )

    @app.get("/health")
    async def health() -> Response:
        response = Response(b"", status=200)
        del response.headers["content-type"]
        return response

    @app.post("/tokenize")
    async def tokenize() -> Response:
        params = parser.tokenize(await body())
        tokens = list(params.tokens)
        return _json(
            {
                "count": len(tokens),
                "max_model_len": cfg.max_model_len,
                "tokens": tokens,
                "token_strs": deps.tokenizer.token_strs(tokens)
                if params.return_token_strs
                else None,
            }
        )

    @app.post("/detokenize")
    async def detokenize() -> Response:
        tokens = parser.detokenize(await body())
        return _json({"prompt": deps.tokenizer.decode(tokens)})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(deps.metrics.render(), content_type=CONTENT_TYPE)

    @app.get("/version")
    async def version() -> Response:
        return _json({"version": VLLM_VERSION})

    @app.get("/load")
    async def load() -> Response:
        return _json({"server_load": in_flight[0]})

    @app.get("/kv_event_sources")
    async def kv_event_sources() -> Response:
        return _json(deps.kv_sources())

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> Response:
        return _json({"success": engine.reset_prefix_cache()})

    @app.get("/sim/cache")
    async def get_cache() -> Response:
        hashes = engine.scheduler.cache.cached_hashes()
        return _json({"blocks": len(hashes), "block_hashes": [f"{h:016x}" for h in hashes]})

    @app.get("/sim/faults")
    async def get_faults() -> Response:
        return _json(engine.faults.as_json())

    @app.post("/sim/faults")
    async def set_faults() -> Response:
        changes = await body()
        if not isinstance(changes, dict):
            raise bad_request("expected a JSON object of fault names to values", param="body")
        try:
            state = engine.faults.updated(changes)
        except ConfigError as exc:
            raise bad_request(f"{exc.key}={exc.value!r}: {exc.reason}", param=exc.key) from exc
        if state.crash:
            print("fleet-sim: crash fault: exiting with status 1", file=sys.stderr, flush=True)
            os._exit(CRASH_STATUS)
        engine.set_faults(state)
        log.warning("faults now %s", state.as_json())
        return _json(state.as_json())

    return app


async def _sse_body(
    deps: ApiDeps,
    params: GenerateParams,
    generation: _Generation,
    request_id: str,
    in_flight: list[int],
) -> AsyncIterator[bytes]:
    created = int(time.time())
    model = params.model
    prompt = len(params.prompt_tokens)
    chat = params.kind == "chat"
    fingerprint_on_finish = None if params.include_usage else deps.fingerprint
    in_flight[0] += 1
    try:
        first = True
        async for delta in generation.deltas():
            usage = (prompt, generation.count) if params.continuous_usage else None
            finish = generation.finish_reason
            if chat and first:
                role_usage = (prompt, 0) if params.continuous_usage else None
                yield sse(
                    chat_role_chunk(
                        request_id=request_id, created=created, model=model, usage=role_usage
                    )
                )
            first = False
            build = chat_chunk if chat else completion_chunk
            yield sse(
                build(
                    request_id=request_id,
                    created=created,
                    model=model,
                    text=delta,
                    finish_reason=finish,
                    stop_reason=generation.stop_reason if finish else None,
                    usage=usage,
                    fingerprint=fingerprint_on_finish if finish else None,
                )
            )
        if params.include_usage:
            yield sse(
                usage_chunk(
                    kind=params.kind,
                    request_id=request_id,
                    created=created,
                    model=model,
                    prompt_tokens=prompt,
                    completion_tokens=generation.count,
                    fingerprint=deps.fingerprint,
                )
            )
        yield SSE_DONE
    finally:
        in_flight[0] -= 1
        generation.close()


__all__ = ["ApiDeps", "create_app"]
