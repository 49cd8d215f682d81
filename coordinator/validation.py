"""Validate OpenAI completion and chat requests before they are routed.

Sans-I/O: takes the raw body bytes and the limits, returns a :class:`ParsedRequest` or raises
:class:`InvalidRequest` naming the parameter. The body that reaches the engine is the client's
original bytes; validation only decides whether it may go.

What is checked is what would otherwise reach an engine as garbage, or make it answer 5xx:
JSON syntax, a JSON object, ``model`` (required here even though a bare vLLM defaults it,
because Fleet serves many models), ``prompt``/``messages`` shapes, token limits, non-finite
numbers (Python's json accepts ``NaN`` and ``Infinity``; JSON does not), and the common
sampling parameters' types. Anything else is left to the engine, which answers 400 itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from .errors import InvalidRequest

RequestKind = Literal["completion", "chat"]

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "function"})


@dataclass(frozen=True)
class ParsedRequest:
    """A request that passed validation."""

    kind: RequestKind
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None
    body: dict[str, Any]


def _reject_constant(name: str) -> Any:
    raise InvalidRequest(f"Non-finite number {name} is not valid JSON.")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidRequest(f"Number {text} is out of range.")
    return value


# One decoder for every body: json.loads with these hooks would build a new one per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_parse_float)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Parse a request body that must be a JSON object.

    Raises:
        InvalidRequest: empty body, invalid UTF-8 or JSON, non-finite numbers, not an object.
    """
    if not raw.strip():
        raise InvalidRequest("Request body is empty; expected a JSON object.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"Request body is not valid UTF-8: {exc}") from exc
    try:
        data = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"Request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise InvalidRequest("Request body is nested too deeply.") from exc
    except ValueError as exc:  # e.g. an integer past Python's 4300-digit conversion limit
        raise InvalidRequest(f"Request body has a value that cannot be read: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequest(f"Request body must be a JSON object, not {_json_type(data)}.")
    return data


def validate(
    kind: RequestKind,
    raw: bytes,
    *,
    max_model_len: int | None = None,
    context_len_of: Callable[[str], int | None] | None = None,
) -> ParsedRequest:
    """Validate a completion or chat request body.

    Args:
        kind: which endpoint received it.
        raw: the body bytes.
        context_len_of: looks up a model's context length by name (used when
            ``max_model_len`` is not given).
        max_model_len: the served model's context length, if known: a ``max_tokens`` above it
            can never be honoured.

    Returns:
        The parsed request.

    Raises:
        InvalidRequest: naming the parameter at fault.
    """
    body = parse_json_object(raw)
    model = body.get("model")
    if model is None:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("`model` must be a non-empty string.", param="model")
    if kind == "completion":
        _check_prompt(body)
    else:
        _check_messages(body)
    stream = _opt_bool(body, "stream", default=False)
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise InvalidRequest("`stream_options` must be an object.", param="stream_options")
        include_usage = _opt_bool(options, "include_usage", default=False, prefix="stream_options.")
    if max_model_len is None and context_len_of is not None:
        max_model_len = context_len_of(model)
    max_tokens = _check_max_tokens(body, max_model_len)
    _check_sampling(body)
    return ParsedRequest(
        kind=kind,
        model=model,
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        body=body,
    )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_prompt(body: dict[str, Any]) -> None:
    if "prompt" not in body:
        raise InvalidRequest("You must provide a prompt.", param="prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return
        if all(_is_int(t) and t >= 0 for t in prompt):
            return
        if all(isinstance(p, list) and p and all(_is_int(t) and t >= 0 for t in p) for p in prompt):
            return
    raise InvalidRequest(
        "`prompt` must be a string, a non-empty array of strings, an array of token ids, "
        f"or an array of token-id arrays; got {_json_type(prompt)}.",
        param="prompt",
    )


def _check_messages(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequest("You must provide `messages`.", param="messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(
            f"`messages` must be a non-empty array; got {_json_type(messages)}.", param="messages"
        )
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"`{where}` must be an object.", param=where)
        role = message.get("role")
        if role is None:
            raise InvalidRequest(f"`{where}` is missing `role`.", param=f"{where}.role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise InvalidRequest(
                f"`{where}.role` must be one of {sorted(CHAT_ROLES)}; got {role!r:.40}.",
                param=f"{where}.role",
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise InvalidRequest(
                f"`{where}.content` must be a string or an array of parts.",
                param=f"{where}.content",
            )


def _opt_bool(body: dict[str, Any], key: str, *, default: bool, prefix: str = "") -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"`{prefix}{key}` must be a boolean.", param=prefix + key)
    return value


def _check_max_tokens(body: dict[str, Any], max_model_len: int | None) -> int | None:
    found: int | None = None
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if not _is_int(value):
            raise InvalidRequest(f"`{key}` must be an integer.", param=key)
        if value < 1:
            raise InvalidRequest(f"`{key}` must be at least 1; got {value}.", param=key)
        if max_model_len is not None and value > max_model_len:
            raise InvalidRequest(
                f"`{key}` is {value}, more than the model's context length of "
                f"{max_model_len} tokens.",
                param=key,
            )
        found = value if found is None else min(found, value)
    return found


_NUMBER_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 100.0),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
}


def _check_sampling(body: dict[str, Any]) -> None:
    for key, (low, high) in _NUMBER_RANGES.items():
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise InvalidRequest(f"`{key}` must be a number.", param=key)
        if not low <= value <= high:
            raise InvalidRequest(f"`{key}` must be within [{low}, {high}]; got {value}.", param=key)
    n = body.get("n")
    if n is not None and (not _is_int(n) or not 1 <= n <= 128):
        raise InvalidRequest("`n` must be an integer from 1 to 128.", param="n")
    for key in ("seed", "logprobs", "top_logprobs", "top_k"):
        value = body.get(key)
        if value is not None and not (_is_int(value) or (key == "logprobs" and value is True)):
            if key == "logprobs" and isinstance(value, bool):
                continue
            raise InvalidRequest(f"`{key}` must be an integer.", param=key)


__all__ = ["CHAT_ROLES", "ParsedRequest", "RequestKind", "parse_json_object", "validate"]
