"""The schema layer of request checking: JSON decoding and field types, pydantic-style.

vLLM's request models are pydantic models behind FastAPI, so a body with a field of the wrong
type is answered with FastAPI's ``RequestValidationError`` rendered by vLLM: "N validation
error(s)" followed by pydantic's error dicts. :class:`Schema` reproduces the lax coercions
pydantic applies (``"5"`` and ``5.0`` are ints, ``NaN`` is a float, ``"true"`` a bool) and the
error dicts for the failures, collecting all of a body's errors before raising one
:func:`~fleet.agent.sim.errors.validation_error`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import describe_input, validation_error

_MISSING = object()


def decode_body(raw: bytes) -> Any:
    """Decode a JSON body like FastAPI does for vLLM.

    Raises:
        SimApiError: empty or not JSON (a schema error at ``body``).
    """
    if not raw.strip():
        raise validation_error(
            [{"type": "missing", "loc": "body", "msg": "Field required", "input": "None"}]
        )
    try:
        return json.loads(raw)
    except UnicodeDecodeError as exc:
        raise validation_error(
            [{"type": "json_invalid", "loc": "body", "msg": "JSON decode error", "input": ""}]
        ) from exc
    except json.JSONDecodeError as exc:
        raise validation_error(
            [
                {
                    "type": "json_invalid",
                    "loc": f"body.{exc.pos}",
                    "msg": "JSON decode error",
                    "input": "<dict of 0 items>",
                    "ctx": {"error": exc.msg},
                }
            ]
        ) from exc


class Schema:
    """Collects pydantic-style errors for one body."""

    def __init__(self, body: Any) -> None:
        if not isinstance(body, dict):
            raise validation_error(
                [
                    {
                        "type": "model_attributes_type",
                        "loc": "body",
                        "msg": "Input should be a valid dictionary or object to extract "
                        "fields from",
                        "input": describe_input(body),
                    }
                ]
            )
        self.body: dict[str, Any] = body
        self.errors: list[dict[str, Any]] = []

    def error(self, kind: str, key: str, msg: str, value: Any) -> None:
        self.errors.append(
            {"type": kind, "loc": f"body.{key}", "msg": msg, "input": describe_input(value)}
        )

    def get_int(self, key: str, default: int | None = None) -> int | None:
        value = self.body.get(key)
        if value is None:
            return default
        if isinstance(value, bool | int):
            return int(value)
        if isinstance(value, float):
            if value.is_integer():
                return int(value)
            self.error(
                "int_from_float",
                key,
                "Input should be a valid integer, got a number with a fractional part",
                value,
            )
            return None
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                self.error(
                    "int_parsing",
                    key,
                    "Input should be a valid integer, unable to parse string as an integer",
                    value,
                )
                return None
        self.error("int_type", key, "Input should be a valid integer", value)
        return None

    def get_float(self, key: str) -> float | None:
        value = self.body.get(key)
        if value is None:
            return None
        if isinstance(value, bool | int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
            self.error(
                "float_parsing",
                key,
                "Input should be a valid number, unable to parse string as a number",
                value,
            )
            return None
        self.error("float_type", key, "Input should be a valid number", value)
        return None

    def get_bool(self, key: str, default: bool) -> bool:
        value = self.body.get(key)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        self.error("bool_parsing", key, "Input should be a valid boolean", value)
        return default

    def get_str(self, key: str) -> str | None:
        value = self.body.get(key)
        if value is None or isinstance(value, str):
            return value
        self.error("string_type", key, "Input should be a valid string", value)
        return None

    def get_dict(self, key: str) -> dict[str, Any] | None:
        value = self.body.get(key)
        if value is None or isinstance(value, dict):
            return value
        self.error("dict_type", key, "Input should be a valid dictionary", value)
        return None

    def get_list(self, key: str) -> list[Any] | None:
        value = self.body.get(key)
        if value is None or isinstance(value, list):
            return value
        self.error("list_type", key, "Input should be a valid list", value)
        return None

    def stop(self) -> tuple[str, ...]:
        value = self.body.get("stop")
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return tuple(value)
        self.error("string_type", "stop", "Input should be a valid string", value)
        return ()

    def done(self) -> None:
        if self.errors:
            raise validation_error(self.errors)


def check_prompt(s: Schema) -> Any:
    value = s.body.get("prompt")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        if all(type(t) is int for t in value):
            return value
        if all(isinstance(p, str) for p in value):
            return value
        if all(isinstance(p, list) and all(type(t) is int for t in p) for p in value):
            return value
    shown = describe_input(value)
    for kind, msg in (
        ("list_type", "Input should be a valid list"),
        ("list_type", "Input should be a valid list"),
        ("string_type", "Input should be a valid string"),
        ("list_type", "Input should be a valid list"),
    ):
        s.errors.append({"type": kind, "loc": "body.prompt", "msg": msg, "input": shown})
    return None


def check_messages(s: Schema, messages: Sequence[Any]) -> None:
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            s.error("dict_type", f"messages.{i}", "Input should be a valid dictionary", message)
            continue
        if not isinstance(message.get("role"), str):
            if "role" not in message:
                s.error("missing", f"messages.{i}.role", "Field required", message)
            else:
                s.error(
                    "string_type", f"messages.{i}.role", "Input should be a valid string", message
                )
        content = message.get("content", _MISSING)
        if content is not _MISSING and not isinstance(content, str | list | type(None)):
            s.error(
                "string_type", f"messages.{i}.content", "Input should be a valid string", content
            )


__all__ = ["Schema", "check_messages", "check_prompt", "decode_body"]
