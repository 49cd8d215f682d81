"""The JSON vLLM 0.32's OpenAI server answers with, field for field and in its key order.

Shapes were captured from a real 0.32 CPU engine (``tests/integration/test_sim_equivalence.py``
keeps checking them). Notable details mirrored here:

* Non-streamed responses carry every optional field as ``null`` (``token_ids``,
  ``prompt_logprobs``, ``routed_experts``, ``kv_transfer_params``, ...).
* Streamed completion chunks: one per token; the finishing chunk carries ``finish_reason``; the
  *last* message before ``data: [DONE]`` carries ``system_fingerprint`` (the usage chunk when
  ``include_usage``, else the finishing chunk). The usage chunk has ``choices: []``.
* Streamed chat: a first chunk with ``delta: {"role": "assistant", "content": ""}`` and the
  top-level ``prompt_token_ids``/``prompt_text`` keys, then one ``{"content": ...}`` delta per
  token; ``stop_reason`` appears on the finishing choice only.
* ``continuous_usage_stats`` adds ``usage`` to every chunk (chat's includes
  ``completion_tokens_details: null``).
"""

from __future__ import annotations

import json
import secrets
from typing import Any

SSE_DONE = b"data: [DONE]\n\n"


def new_request_id(kind: str, header_id: str | None) -> str:
    """vLLM's response id: ``cmpl-``/``chatcmpl-`` plus ``X-Request-Id`` or 16 random hex."""
    prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
    return prefix + (header_id if header_id else secrets.token_hex(8))


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON, like pydantic's ``model_dump_json``."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def sse(value: Any) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    return b"data: " + dumps(value) + b"\n\n"


def _usage(prompt: int, completion: int, *, details: bool) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
    }
    if details:
        usage["prompt_tokens_details"] = None
        usage["completion_tokens_details"] = None
    return usage


def completion_response(
    *,
    request_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str,
    stop_reason: str | None,
    prompt_tokens: int,
    completion_tokens: int,
    fingerprint: str,
    kv_transfer_params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A non-streamed ``/v1/completions`` response."""
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": stop_reason,
                "token_ids": None,
                "prompt_logprobs": None,
                "prompt_token_ids": None,
                "routed_experts": None,
            }
        ],
        "service_tier": None,
        "system_fingerprint": fingerprint,
        "usage": _usage(prompt_tokens, completion_tokens, details=True),
        "kv_transfer_params": kv_transfer_params,
        "ec_transfer_params": None,
        "metrics": None,
    }


def completion_chunk(
    *,
    request_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str | None,
    stop_reason: str | None,
    usage: tuple[int, int] | None = None,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """One streamed ``/v1/completions`` chunk for one token."""
    chunk: dict[str, Any] = {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": stop_reason,
                "prompt_token_ids": None,
                "token_ids": None,
            }
        ],
    }
    if fingerprint is not None:
        chunk["system_fingerprint"] = fingerprint
    if usage is not None:
        chunk["usage"] = _usage(*usage, details=False)
    return chunk


def usage_chunk(
    *,
    kind: str,
    request_id: str,
    created: int,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    fingerprint: str,
) -> dict[str, Any]:
    """The final streamed chunk when ``stream_options.include_usage`` is set."""
    return {
        "id": request_id,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": _usage(prompt_tokens, completion_tokens, details=False),
        "system_fingerprint": fingerprint,
    }


def chat_response(
    *,
    request_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str,
    stop_reason: str | None,
    prompt_tokens: int,
    completion_tokens: int,
    fingerprint: str,
    kv_transfer_params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A non-streamed ``/v1/chat/completions`` response."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": text,
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "reasoning": None,
                },
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": stop_reason,
                "token_ids": None,
                "routed_experts": None,
            }
        ],
        "service_tier": None,
        "system_fingerprint": fingerprint,
        "usage": _usage(prompt_tokens, completion_tokens, details=True),
        "prompt_logprobs": None,
        "prompt_token_ids": None,
        "prompt_text": None,
        "kv_transfer_params": kv_transfer_params,
        "ec_transfer_params": None,
        "metrics": None,
    }


def chat_role_chunk(
    *, request_id: str, created: int, model: str, usage: tuple[int, int] | None = None
) -> dict[str, Any]:
    """The first streamed chat chunk: the assistant role, empty content."""
    chunk: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
    }
    if usage is not None:
        chunk["usage"] = _chat_chunk_usage(*usage)
    chunk["prompt_token_ids"] = None
    chunk["prompt_text"] = None
    return chunk


def chat_chunk(
    *,
    request_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str | None,
    stop_reason: str | None,
    usage: tuple[int, int] | None = None,
    fingerprint: str | None = None,
) -> dict[str, Any]:
    """One streamed chat chunk for one token."""
    choice: dict[str, Any] = {
        "index": 0,
        "delta": {"content": text},
        "logprobs": None,
        "finish_reason": finish_reason,
    }
    if finish_reason is not None:
        choice["stop_reason"] = stop_reason
    choice["token_ids"] = None
    chunk: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [choice],
    }
    if usage is not None:
        chunk["usage"] = _chat_chunk_usage(*usage)
    if fingerprint is not None:
        chunk["system_fingerprint"] = fingerprint
    return chunk


def _chat_chunk_usage(prompt: int, completion: int) -> dict[str, Any]:
    usage = _usage(prompt, completion, details=False)
    usage["completion_tokens_details"] = None
    return usage


def models_response(
    *, names: tuple[str, ...], root: str, max_model_len: int, created: int
) -> dict[str, Any]:
    """``GET /v1/models``: one entry per served name."""
    return {
        "object": "list",
        "data": [
            {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "vllm",
                "root": root,
                "parent": None,
                "max_model_len": max_model_len,
                "permission": [
                    {
                        "id": f"modelperm-{secrets.token_hex(8)}",
                        "object": "model_permission",
                        "created": created,
                        "allow_create_engine": False,
                        "allow_sampling": True,
                        "allow_logprobs": True,
                        "allow_search_indices": False,
                        "allow_view": True,
                        "allow_fine_tuning": False,
                        "organization": "*",
                        "group": None,
                        "is_blocking": False,
                    }
                ],
            }
            for name in names
        ],
    }


__all__ = [
    "SSE_DONE",
    "chat_chunk",
    "chat_response",
    "chat_role_chunk",
    "completion_chunk",
    "completion_response",
    "dumps",
    "models_response",
    "new_request_id",
    "sse",
    "usage_chunk",
]
