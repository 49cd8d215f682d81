"""vLLM's render routes: ``POST /v1/completions/render`` and ``/v1/chat/completions/render``.

vLLM 0.32 answers them (vllm/entrypoints/scale_out/render/) only when started with
``--enable-scale-out``; otherwise every scale-out route answers ``403 PermissionDeniedError``.
Routers tokenize through them: vllm-router's ``cache_aware`` and ``kv_aware`` policies read
``token_ids`` from the chat route and route prefix-blind when it fails.

The body is vLLM's ``GenerateRequest`` (pydantic ``model_dump``). Its ``sampling_params`` is a
msgspec struct encoded with ``omit_defaults``; which keys appear was read off a real vLLM 0.32.0
CPU engine, and ``tests/integration/test_sim_equivalence.py`` compares the two for a set of
requests:

- always: the three penalties and ``temperature`` (as the request gives them, or their
  defaults), ``stop`` and ``stop_token_ids`` (lists), ``output_kind`` (1 = delta when streaming,
  2 = final only), ``skip_clone``, ``bad_words``, ``skip_reading_prefix_cache``;
- unless greedy (temperature below 1e-5 resets them): ``top_p`` and ``min_p``, and ``top_k``
  when it is not 0;
- only when they differ from the default: ``n`` (1), ``seed`` (None), ``ignore_eos`` (False),
  ``min_tokens`` (0), ``logprobs`` (None), ``max_tokens`` (16; chat requests without a limit get
  the room left in the context, as vLLM's ``get_max_tokens`` computes).
"""

from __future__ import annotations

from typing import Any

from .errors import SimApiError
from .requests import GREEDY_EPS, GenerateParams

SCALE_OUT_DISABLED = (
    "Scale-out endpoints are disabled. Restart vllm serve with --enable-scale-out to enable them."
)

OUTPUT_KIND_DELTA = 1
OUTPUT_KIND_FINAL_ONLY = 2
DEFAULT_MAX_TOKENS = 16  # SamplingParams.max_tokens's default: omitted when equal


def scale_out_disabled() -> SimApiError:
    """vLLM's answer on a scale-out route of an engine started without ``--enable-scale-out``."""
    return SimApiError(SCALE_OUT_DISABLED, status=403, type="PermissionDeniedError")


def _float(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    return default if value is None else float(value)


def sampling_params(body: dict[str, Any], params: GenerateParams) -> dict[str, Any]:
    """The ``sampling_params`` object of one rendered request.

    Args:
        body: the request body (already checked by the parser).
        params: what the parser made of it.
    """
    temperature = _float(body, "temperature", 1.0)
    greedy = temperature < GREEDY_EPS
    out: dict[str, Any] = {}
    n = body.get("n")
    if n is not None and n != 1:
        out["n"] = n
    out["presence_penalty"] = _float(body, "presence_penalty", 0.0)
    out["frequency_penalty"] = _float(body, "frequency_penalty", 0.0)
    out["repetition_penalty"] = _float(body, "repetition_penalty", 1.0)
    out["temperature"] = temperature
    if not greedy:
        out["top_p"] = _float(body, "top_p", 1.0)
        top_k = body.get("top_k")
        if top_k not in (None, 0, -1):
            out["top_k"] = top_k
        out["min_p"] = _float(body, "min_p", 0.0)
    if params.seed is not None:
        out["seed"] = params.seed
    out["stop"] = list(params.stop)
    out["stop_token_ids"] = list(body.get("stop_token_ids") or [])
    if body.get("ignore_eos"):
        out["ignore_eos"] = True
    max_tokens = _max_tokens(body, params)
    if max_tokens != DEFAULT_MAX_TOKENS:
        out["max_tokens"] = max_tokens
    min_tokens = body.get("min_tokens")
    if min_tokens:
        out["min_tokens"] = min_tokens
    logprobs = _logprobs(body, params)
    if logprobs is not None:
        out["logprobs"] = logprobs
    out["output_kind"] = OUTPUT_KIND_DELTA if params.stream else OUTPUT_KIND_FINAL_ONLY
    out["skip_clone"] = True
    out["bad_words"] = []
    out["skip_reading_prefix_cache"] = False
    return out


def _logprobs(body: dict[str, Any], params: GenerateParams) -> int | None:
    if params.kind == "chat":
        if not body.get("logprobs"):
            return None
        top = body.get("top_logprobs")
        return 0 if top is None else int(top)
    value = body.get("logprobs")
    return None if value is None else int(value)


def _max_tokens(body: dict[str, Any], params: GenerateParams) -> int:
    if params.kind == "chat":
        # The parser already turned "no limit" into the room left in the context.
        return params.max_tokens
    asked = body.get("max_tokens")
    return DEFAULT_MAX_TOKENS if asked is None else params.max_tokens


def generate_request(
    body: dict[str, Any], params: GenerateParams, request_id: str
) -> dict[str, Any]:
    """vLLM's ``GenerateRequest.model_dump()`` for one rendered prompt."""
    stream_options: dict[str, Any] | None = None
    options = body.get("stream_options")
    if params.stream and isinstance(options, dict):
        include = options.get("include_usage")  # both default to False
        continuous = options.get("continuous_usage_stats")
        stream_options = {
            "include_usage": bool(include),
            "continuous_usage_stats": bool(continuous),
        }
    return {
        "request_id": request_id,
        "token_ids": list(params.prompt_tokens),
        "token_offsets": None,
        "features": None,
        "content_parts": None,
        "sampling_params": sampling_params(body, params),
        "model": body.get("model"),
        "reasoning_ended": None,
        "reasoning_parser_kwargs": None,
        "return_token_ids": None,
        "output_mode": "tokens",
        "stream": params.stream,
        "stream_options": stream_options,
        "cache_salt": body.get("cache_salt"),
        "priority": body.get("priority", 0),
        "kv_transfer_params": None,
        "ec_transfer_params": None,
    }


__all__ = ["SCALE_OUT_DISABLED", "generate_request", "sampling_params", "scale_out_disabled"]
