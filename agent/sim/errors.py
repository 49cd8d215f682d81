"""The simulator's HTTP errors, rendered the way vLLM 0.32's OpenAI server renders them.

::

    FleetError (fleet.protocol.errors)
    └── SimApiError              a request answered with vLLM's {"error": {...}} body
        ├── bad_request()        400 "BadRequestError": vLLM's own checks (VLLMValidationError)
        ├── validation_error()   400 "Bad Request": request-schema errors (pydantic's, via FastAPI)
        ├── not_found()          404 "NotFoundError": unknown model
        └── internal_error()     500 "InternalServerError": the ``fail_fraction`` fault

vLLM's body is ``{"error": {"message", "type", "param", "code"}}`` with ``code`` the HTTP status.
Its own checks append ``(parameter=NAME, value=VALUE)`` to the message and name the parameter;
schema errors list pydantic's error dicts and name ``body.<field>`` as the parameter. Unknown
routes and wrong methods keep Starlette's ``{"detail": ...}`` body (see :mod:`.api`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from fleet.protocol.errors import FleetError


class SimApiError(FleetError):
    """An error answered with vLLM's error body.

    Args:
        message: the message, as vLLM words it.
        status: the HTTP status (also the body's ``code``).
        type: vLLM's error type, e.g. ``BadRequestError``.
        param: the parameter at fault, or None.
    """

    def __init__(self, message: str, *, status: int, type: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param

    def body(self) -> bytes:
        """The JSON body, compact like pydantic's ``model_dump_json``."""
        return json.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "param": self.param,
                    "code": self.status,
                }
            },
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode()


def bad_request(message: str, *, param: str | None = None, value: Any = None) -> SimApiError:
    """A failed vLLM-side check (``VLLMValidationError``).

    Args:
        message: the check's message.
        param: the parameter; when given, ``(parameter=..., value=...)`` is appended like vLLM's
            ``VLLMValidationError.__str__`` does (``value`` only when not None).
        value: the offending value.
    """
    if param is not None:
        suffix = f"parameter={param}" + (f", value={value}" if value is not None else "")
        message = f"{message} ({suffix})"
    return SimApiError(message, status=400, type="BadRequestError", param=param)


def validation_error(errors: Sequence[dict[str, Any]]) -> SimApiError:
    """A request-schema failure, worded like FastAPI's ``RequestValidationError`` in vLLM.

    Args:
        errors: pydantic-style error dicts (``type``, ``loc`` joined with dots, ``msg``,
            ``input`` and optionally ``ctx``), first one names the parameter.
    """
    count = len(errors)
    head = f"{count} validation error{'s' if count != 1 else ''}:"
    lines = [head] + [f"  {e!r}" for e in errors]
    param = str(errors[0]["loc"]) if errors else None
    return SimApiError("\n".join(lines), status=400, type="Bad Request", param=param)


def not_found(model: str, served: Sequence[str]) -> SimApiError:
    """The requested model is not served here."""
    aliases = ", ".join(served)
    return SimApiError(
        f"The model `{model}` does not exist. Valid aliases: {aliases}.",
        status=404,
        type="NotFoundError",
        param="model",
    )


def internal_error(message: str) -> SimApiError:
    """A server-side failure (the ``fail_fraction`` fault)."""
    return SimApiError(message, status=500, type="InternalServerError")


def describe_input(value: Any) -> str:
    """How vLLM's validation messages show an input: containers summarised, scalars as text."""
    if isinstance(value, dict):
        return f"<dict of {len(value)} items>"
    if isinstance(value, list):
        return f"<list of {len(value)} items>"
    if value is None:
        return "None"
    if isinstance(value, bool):
        return str(value)
    text = str(value)
    return text if len(text) <= 200 else text[:200] + "...[truncated]"


__all__ = [
    "SimApiError",
    "bad_request",
    "describe_input",
    "internal_error",
    "not_found",
    "validation_error",
]
