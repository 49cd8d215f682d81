"""Answers in and out of the response cache: read from an engine's response (whole, or its
server-sent events as they pass), and written back as vLLM 0.32 writes them (docs/CACHE.md).

An answer is kept only when it is one plain choice: text (chat: content, no tool calls, no
reasoning), a ``finish_reason`` and the usage. A replayed stream is what vLLM sends for it:
for chat a first chunk with the assistant role, one chunk with the whole text, the finishing
chunk (empty text, ``finish_reason``), the usage chunk (``choices: []``) when
``stream_options.include_usage``, and ``data: [DONE]``; ``system_fingerprint`` on the last
message before ``[DONE]``; ``continuous_usage_stats`` puts ``usage`` on every chunk. Ids are
vLLM's (``cmpl-``/``chatcmpl-`` and the request's ``x-request-id``) and ``created`` is now.
"""

from __future__ import annotations

import json
from typing import Any

from .respcache import Answer
from .resume import DONE, event_data

SSE_DONE = DONE + b"\n\n"


def answer_from_body(kind: str, raw: bytes) -> Answer | None:
    """The answer in a whole (non-streamed) response body; None if it is not one plain,
    finished choice with its usage."""
    try:
        body = json.loads(raw)
        (choice,) = body["choices"]
        usage = body["usage"]
        if kind == "chat":
            message = choice["message"]
            if (
                message.get("tool_calls")
                or message.get("reasoning")
                or message.get("reasoning_content")
            ):
                return None
            text = message["content"]
        else:
            text = choice["text"]
        answer = Answer(
            kind=kind,
            text=text,
            finish_reason=choice["finish_reason"],
            stop_reason=choice.get("stop_reason"),
            prompt_tokens=usage["prompt_tokens"],
            completion_tokens=usage["completion_tokens"],
            fingerprint=body.get("system_fingerprint"),
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    return answer if _plain(answer) else None


def _plain(answer: Answer) -> bool:
    return (
        isinstance(answer.text, str)
        and isinstance(answer.finish_reason, str)
        and isinstance(answer.prompt_tokens, int)
        and isinstance(answer.completion_tokens, int)
    )


class StreamTap:
    """Reads a streamed answer event by event (:meth:`keep`), for the cache.

    Args:
        kind: ``"completion"`` or ``"chat"``.
        drop_usage: the usage chunk was asked for by Fleet, not the client: :meth:`keep`
            says to drop it.
    """

    def __init__(self, kind: str, *, drop_usage: bool) -> None:
        self.kind = kind
        self.drop_usage = drop_usage
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.usage: tuple[int, int] | None = None
        self.fingerprint: str | None = None
        self.done = False
        self.spoiled = False  # an error, several choices, tool calls: nothing to keep

    def keep(self, event: bytes) -> bool:
        """Note one event (with its trailing blank line); whether it goes to the client."""
        data = event_data(event)
        if data is None:
            return True
        if data == b"[DONE]":
            self.done = True
            return True
        try:
            chunk = json.loads(data)
            self._note(chunk)
        except (ValueError, TypeError, KeyError, AttributeError):
            self.spoiled = True
            return True
        usage_only = isinstance(chunk, dict) and chunk.get("choices") == [] and "usage" in chunk
        return not (usage_only and self.drop_usage)

    def _note(self, chunk: dict[str, Any]) -> None:
        if "error" in chunk:
            self.spoiled = True
            return
        if chunk.get("system_fingerprint") is not None:
            self.fingerprint = chunk["system_fingerprint"]
        usage = chunk.get("usage")
        if usage:
            self.usage = (int(usage["prompt_tokens"]), int(usage["completion_tokens"]))
        choices = chunk["choices"]
        if len(choices) > 1:
            self.spoiled = True
        for choice in choices:
            if choice.get("index", 0) != 0:
                self.spoiled = True
                continue
            if self.kind == "chat":
                delta = choice.get("delta") or {}
                if (
                    delta.get("tool_calls")
                    or delta.get("reasoning")
                    or delta.get("reasoning_content")
                ):
                    self.spoiled = True
                text = delta.get("content")
            else:
                text = choice.get("text")
            if isinstance(text, str):
                self.parts.append(text)
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]
                self.stop_reason = choice.get("stop_reason")

    def answer(self) -> Answer | None:
        """The whole answer, once the stream ended well (``[DONE]`` after a finish and the
        usage); else None."""
        if self.spoiled or not self.done or self.finish_reason is None or self.usage is None:
            return None
        return Answer(
            kind=self.kind,
            text="".join(self.parts),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            prompt_tokens=self.usage[0],
            completion_tokens=self.usage[1],
            fingerprint=self.fingerprint,
        )


def response_id(kind: str, request_id: str) -> str:
    """vLLM's response id for a request with ``x-request-id`` ``request_id``."""
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id


def _usage(answer: Answer, *, details: bool, completion: int | None = None) -> dict[str, Any]:
    done = answer.completion_tokens if completion is None else completion
    usage: dict[str, Any] = {
        "prompt_tokens": answer.prompt_tokens,
        "total_tokens": answer.prompt_tokens + done,
        "completion_tokens": done,
    }
    if details:
        usage["prompt_tokens_details"] = None
        usage["completion_tokens_details"] = None
    return usage


def render_body(answer: Answer, *, model: str, request_id: str, created: int) -> bytes:
    """The non-streamed response vLLM sends for ``answer``."""
    if answer.kind == "chat":
        message = {"role": "assistant", "content": answer.text, "refusal": None,
                   "annotations": None, "audio": None, "function_call": None,
                   "reasoning": None}  # fmt: skip
        choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None,
                                  "finish_reason": answer.finish_reason,
                                  "stop_reason": answer.stop_reason, "token_ids": None,
                                  "routed_experts": None}  # fmt: skip
        tail = {"prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": answer.text, "logprobs": None,
                  "finish_reason": answer.finish_reason, "stop_reason": answer.stop_reason,
                  "token_ids": None, "prompt_logprobs": None, "prompt_token_ids": None,
                  "routed_experts": None}  # fmt: skip
        tail = {}
        obj = "text_completion"
    body = {"id": response_id(answer.kind, request_id), "object": obj, "created": created,
            "model": model, "choices": [choice], "service_tier": None,
            "system_fingerprint": answer.fingerprint, "usage": _usage(answer, details=True),
            **tail, "kv_transfer_params": None, "ec_transfer_params": None,
            "metrics": None}  # fmt: skip
    return _dumps(body)


def render_stream(
    answer: Answer,
    *,
    model: str,
    request_id: str,
    created: int,
    include_usage: bool,
    continuous_usage: bool = False,
) -> list[bytes]:
    """The server-sent events vLLM sends for ``answer`` streamed, ``[DONE]`` last."""
    chat = answer.kind == "chat"
    head = {"id": response_id(answer.kind, request_id),
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model}  # fmt: skip
    each_usage = include_usage and continuous_usage

    def chunk(text: str, finish: str | None, done: int, *, role: bool = False) -> dict[str, Any]:
        if chat:
            delta = {"role": "assistant", "content": text} if role else {"content": text}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                                      "finish_reason": finish}  # fmt: skip
            if finish is not None:
                choice["stop_reason"] = answer.stop_reason
            if not role:
                choice["token_ids"] = None
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                      "stop_reason": answer.stop_reason if finish else None,
                      "prompt_token_ids": None, "token_ids": None}  # fmt: skip
        out: dict[str, Any] = {**head, "choices": [choice]}
        if each_usage:
            out["usage"] = _usage(answer, details=False, completion=done)
            if chat:
                out["usage"]["completion_tokens_details"] = None
        if role:
            out["prompt_token_ids"] = None
            out["prompt_text"] = None
        return out

    chunks: list[dict[str, Any]] = []
    if chat:
        chunks.append(chunk("", None, 0, role=True))
    if answer.text:
        chunks.append(chunk(answer.text, None, answer.completion_tokens))
    chunks.append(chunk("", answer.finish_reason, answer.completion_tokens))
    if include_usage:
        chunks.append({**head, "choices": [], "usage": _usage(answer, details=False)})
    if answer.fingerprint is not None:
        chunks[-1]["system_fingerprint"] = answer.fingerprint
    return [b"data: " + _dumps(c) + b"\n\n" for c in chunks] + [SSE_DONE]


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


__all__ = [
    "SSE_DONE",
    "StreamTap",
    "answer_from_body",
    "render_body",
    "render_stream",
    "response_id",
]
