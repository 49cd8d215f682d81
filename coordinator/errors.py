"""The coordinator's errors, and the one place OpenAI-style error bodies are rendered.

::

    FleetError (fleet.protocol.errors)
    └── ApiError               a request the coordinator answers with an HTTP error
        ├── InvalidRequest     400: the body is not a valid request
        ├── ModelNotFound      404: no live engine serves the model
        ├── PayloadTooLarge    413: the body is over the configured limit
        └── NoCapacity         503: the model exists but no engine can take the request now
    UpstreamError              an engine failed to answer (translated from httpx, ``from exc``)
"""

from __future__ import annotations

import json

from fleet.protocol.errors import FleetError


class ApiError(FleetError):
    """A request the coordinator answers with an HTTP error.

    Args:
        message: shown to the client.
        status: the HTTP status.
        type: OpenAI's error type (``invalid_request_error``, ...).
        param: the request parameter at fault, if any.
        code: a short machine-readable code, if any.
        retry_after_s: sets ``Retry-After`` when given.
    """

    status = 400
    type = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status is not None:
            self.status = status
        self.retry_after_s = retry_after_s


class InvalidRequest(ApiError):
    """Raised when the body is not a valid request (400)."""


class ModelNotFound(ApiError):
    """Raised when no live engine serves the requested model (404)."""

    status = 404

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model `{model}` does not exist or has no live engine.",
            param="model",
            code="model_not_found",
        )


class PayloadTooLarge(ApiError):
    """Raised when the body is larger than the configured limit (413)."""

    status = 413

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(
            f"Request body is larger than the limit of {limit_bytes} bytes.",
            code="payload_too_large",
        )


class NoCapacity(ApiError):
    """Raised when the model is known but no engine can take the request now (503)."""

    status = 503
    type = "service_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, code="no_capacity", retry_after_s=retry_after_s)


class DeadlineExceeded(ApiError):
    """Raised when a request's deadline passes before an engine's response started (504)."""

    status = 504
    type = "timeout"

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            f"No engine answered within the request's deadline ({timeout_s:g} s).",
            code="deadline_exceeded",
        )


class UpstreamError(FleetError):
    """Raised when an engine fails to answer: connection refused or reset, timeout.

    Args:
        engine_id: the engine that failed.
        message: what happened.
        reason: ``refused`` (nothing listens: the engine is gone), ``connect`` (reset, protocol
            error), ``timeout``, or ``down`` (its health probe failed while this waited).
    """

    def __init__(self, engine_id: str, message: str, reason: str = "connect") -> None:
        super().__init__(f"engine {engine_id}: {message}")
        self.engine_id = engine_id
        self.reason = reason


def error_body(
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | int | None = None,
) -> bytes:
    """Return OpenAI's ``{"error": {...}}`` body as JSON bytes."""
    return json.dumps(
        {"error": {"message": message, "type": type, "param": param, "code": code}}
    ).encode()


def render(err: ApiError) -> tuple[bytes, int, dict[str, str]]:
    """Return body, status and headers for an :class:`ApiError`."""
    headers = {"content-type": "application/json"}
    if err.retry_after_s is not None:
        headers["retry-after"] = str(err.retry_after_s)
    body = error_body(err.message, type=err.type, param=err.param, code=err.code)
    return body, err.status, headers


__all__ = [
    "ApiError",
    "InvalidRequest",
    "ModelNotFound",
    "NoCapacity",
    "PayloadTooLarge",
    "UpstreamError",
    "error_body",
    "render",
]
