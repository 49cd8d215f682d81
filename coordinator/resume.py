"""Mid-stream resume: continue a broken stream on another engine, seamlessly for the client.

When an engine dies (or stops producing) after a streamed response has started, the gateway
asks another engine for the rest: a completion's prompt becomes the prompt plus the text already
generated; a chat request gets the partial assistant message appended and continued
(``continue_final_message``, as vLLM's chat API offers). The token budget shrinks by what was
generated. The continuation's chunks are rewritten to belong to the first stream (its ``id``,
``created`` and ``model``; no second ``role`` delta), so the client reads one well-formed stream.

``usage`` stays truthful: the client sees the original prompt's tokens (the coordinator tokenizes
it as vLLM does) and, as completion tokens, the tokens generated before the break (its text,
tokenized on its own: the count the continuation's ``max_tokens`` was cut by) plus the
continuation's own. A stream that ran out of budget reports exactly ``max_tokens``. (The
continuing engine's prompt count less the original prompt's is no measure of what came before:
the text retokenized after the prompt can merge across the boundary, and chat adds template
tokens; that count once reported 201 completion tokens for ``max_tokens`` 200.)

Limits (such a stream ends with an error event instead, still well formed): several choices
(``n`` > 1, ``best_of``), ``echo``, prompts that are not one text (token ids, batches), tool calls,
structured output (``response_format``, ``guided_*``, ``structured_outputs``: the grammar's state
is lost), ``prompt_logprobs``. Sampling is continuous in distribution, not in its random stream:
a seeded request resumed elsewhere does not reproduce the tokens an uninterrupted run would.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DONE = b"data: [DONE]"
_NOT_RESUMABLE_KEYS = (
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
    "prompt_logprobs",
    "tools",
)
COMPLETION_DEFAULT_MAX_TOKENS = 16  # vLLM's default for /v1/completions


class SseSplitter:
    """Cuts a byte stream into whole server-sent events (each ends with a blank line)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[bytes]:
        """The events completed by ``data``, each with its trailing ``\\n\\n``."""
        self._buffer += data
        if b"\n\n" not in self._buffer:
            return []
        *events, self._buffer = self._buffer.split(b"\n\n")
        return [event + b"\n\n" for event in events]


def event_data(event: bytes) -> bytes | None:
    """An event's ``data:`` payload (None for comments and other fields)."""
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            return line[5:].strip()
    return None


@dataclass
class Progress:
    """What a stream has delivered to the client so far (its first choice)."""

    kind: str  # "completion" or "chat"
    text: str = ""
    chunks: int = 0  # chunks that carried text (each at least one token)
    finish_reason: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # id, created, model, object
    tool_calls: bool = False
    other_choices: bool = False
    usage_sent: bool = False

    def absorb(self, chunk: Mapping[str, Any]) -> None:
        """Account for one chunk the client received."""
        if not self.meta:
            self.meta = {k: chunk[k] for k in ("id", "created", "model", "object") if k in chunk}
        if chunk.get("usage") and not chunk.get("choices"):
            self.usage_sent = True
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                self.other_choices = True
                continue
            if self.kind == "chat":
                delta = choice.get("delta") or {}
                piece = delta.get("content") or ""
                if delta.get("tool_calls"):
                    self.tool_calls = True
            else:
                piece = choice.get("text") or ""
            if piece:
                self.text += piece
                self.chunks += 1
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]

    def absorb_events(self, events: list[bytes]) -> None:
        """Account for raw events the client received (parsed only now, when needed)."""
        for event in events:
            data = event_data(event)
            if not data or data == b"[DONE]":
                continue
            try:
                chunk = json.loads(data)
            except ValueError:
                continue
            if isinstance(chunk, dict):
                self.absorb(chunk)


def why_not_resumable(kind: str, body: Mapping[str, Any]) -> str | None:
    """Why a streamed request cannot be continued on another engine, or None if it can."""
    if (body.get("n") or 1) != 1 or (body.get("best_of") or 1) != 1:
        return "several choices (n > 1)"
    if body.get("echo"):
        return "echo"
    for key in _NOT_RESUMABLE_KEYS:
        if body.get(key):
            return f"`{key}`"
    if kind == "completion":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            return "the prompt is not one text"
    return None


def continuation(
    kind: str, body: Mapping[str, Any], progress: Progress, generated_tokens: int
) -> dict[str, Any] | str:
    """The request that asks another engine for the rest of the stream, or why there is none.

    Args:
        kind: "completion" or "chat".
        body: the client's request.
        progress: what the client got so far.
        generated_tokens: how many tokens that text is (the coordinator's tokenizer, or the
            chunk count when there is none).
    """
    reason = why_not_resumable(kind, body)
    if reason is not None:
        return reason
    if progress.tool_calls or progress.other_choices:
        return "tool calls or several choices in the stream"
    out = dict(body)
    out["stream"] = True
    if kind == "completion":
        prompt = body["prompt"]
        text = prompt[0] if isinstance(prompt, list) else prompt
        out["prompt"] = text + progress.text
        budget = body.get("max_tokens")
        budget = COMPLETION_DEFAULT_MAX_TOKENS if budget is None else budget
        out["max_tokens"] = budget - generated_tokens
    else:
        messages = [dict(m) if isinstance(m, Mapping) else m for m in body.get("messages") or []]
        last = messages[-1] if messages else None
        if (
            body.get("continue_final_message")
            and isinstance(last, dict)
            and last.get("role") == "assistant"
            and isinstance(last.get("content"), str)
        ):
            last["content"] = last["content"] + progress.text
        else:
            messages.append({"role": "assistant", "content": progress.text})
        out["messages"] = messages
        out["continue_final_message"] = True
        out["add_generation_prompt"] = False
        for key in ("max_tokens", "max_completion_tokens"):
            if body.get(key) is not None:
                out[key] = body[key] - generated_tokens
    if body.get("min_tokens"):
        out["min_tokens"] = max(0, body["min_tokens"] - generated_tokens)
    left = [out[k] for k in ("max_tokens", "max_completion_tokens") if out.get(k) is not None]
    if left and min(left) <= 0:
        return "budget spent"
    return out


@dataclass
class Rewriter:
    """Makes a continuation's chunks part of the first stream.

    Args:
        progress: the first stream's progress (its ``meta`` names the stream; updated here).
        prompt_tokens: the original prompt's token count, or None when unknown.
        generated_tokens: tokens generated before this continuation began.
        include_usage: whether the client asked for a usage chunk.
    """

    progress: Progress
    prompt_tokens: int | None
    generated_tokens: int
    include_usage: bool

    def rewrite(self, event: bytes) -> bytes | None:
        """The event as the client gets it, or None to drop it."""
        data = event_data(event)
        if data is None or data == b"[DONE]":
            return event
        try:
            chunk = json.loads(data)
        except ValueError:
            return event
        if not isinstance(chunk, dict) or "error" in chunk:
            return event
        chunk.update(self.progress.meta)
        usage = chunk.get("usage")
        if usage:
            self._fix_usage(usage)
        if not chunk.get("choices"):
            if not usage or not self.include_usage:
                return None
        elif self.progress.kind == "chat":
            for choice in chunk["choices"]:
                delta = choice.get("delta") or {}
                delta.pop("role", None)
            if not any(_carries(c) for c in chunk["choices"]) and not usage:
                return None  # the continuation's opening role chunk
        self.progress.absorb(chunk)
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    def _fix_usage(self, usage: dict[str, Any]) -> None:
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        before = self.generated_tokens
        if self.prompt_tokens is not None and prompt >= self.prompt_tokens:
            prompt = self.prompt_tokens
        else:
            prompt = max(prompt - before, 0)
        usage["prompt_tokens"] = prompt
        usage["completion_tokens"] = before + completion
        usage["total_tokens"] = prompt + before + completion
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            details["cached_tokens"] = min(details["cached_tokens"], prompt)


def _carries(choice: Mapping[str, Any]) -> bool:
    delta = choice.get("delta") or {}
    return bool(
        delta.get("content")
        or delta.get("tool_calls")
        or delta.get("reasoning_content")
        or choice.get("finish_reason") is not None
        or choice.get("logprobs")
    )


def closing_events(
    progress: Progress,
    *,
    finish_reason: str | None,
    usage: dict[str, int] | None,
) -> list[bytes]:
    """Events that end a stream whose engine is gone but whose answer was complete: a finish
    chunk if none was sent, a usage chunk if one is owed, then ``[DONE]``."""
    out = []
    meta = progress.meta
    if finish_reason is not None:
        if progress.kind == "chat":
            choice: dict[str, Any] = {"index": 0, "delta": {}, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": "", "finish_reason": finish_reason}
        out.append(_event({**meta, "choices": [choice]}))
    if usage is not None:
        out.append(_event({**meta, "choices": [], "usage": usage}))
    out.append(DONE + b"\n\n")
    return out


def error_event(message: str, code: int = 503) -> bytes:
    """An error inside a stream, shaped as vLLM's (``{"error": {...}}``)."""
    error = {"message": message, "type": "ServiceUnavailableError", "param": None, "code": code}
    return _event({"error": error})


def _event(obj: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


__all__ = [
    "DONE",
    "Progress",
    "Rewriter",
    "SseSplitter",
    "closing_events",
    "continuation",
    "error_event",
    "event_data",
    "why_not_resumable",
]
