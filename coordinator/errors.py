"""The coordinator's errors, and the one place OpenAI-style error bodies are rendered.

::

    FleetError (fleet.protocol.errors)
    └── ApiError               a request the coordinator answers with an HTTP error
        ├── InvalidRequest     400: the body is not a valid request
        ├── ModelNotFound      404: no live engine serves the model
        ├── PayloadTooLarge    413: the body is over the configured limit
        └── NoCapacity         503: the model exists but no engine can take the request now
    UpstreamError              an engine failed to answer (translated from httpx, ``from exc``)
    ModelFormatError           a model folder's files cannot be read as a model (safetensors)
    ConfigError (fleet.protocol.errors)
    ├── DeploymentError        a FleetModel document is invalid (names deployment and fields)
    └── DeploymentsError       a folder of deployments has problems (lists every one, by file)
"""

from __future__ import annotations

import json

from fleet.protocol.errors import ConfigError, FleetError


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
        code: str | int | None = None,
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


class BadGateway(ApiError):
    """Raised when an engine's response broke before it reached the client whole (502)."""

    status = 502
    type = "server_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="upstream_broken")


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


class DeploymentError(ConfigError):
    """Raised when a FleetModel deployment document is invalid.

    Args:
        deployment: the deployment's ``metadata.name`` (``"?"`` when it has none).
        problems: ``(field path, what is wrong)`` pairs, at least one; the message puts each on
            its own line as ``deployment 'NAME': FIELD: PROBLEM``.
    """

    def __init__(self, deployment: str, problems: list[tuple[str, str]]) -> None:
        field, reason = problems[0]
        lines = [f"deployment {deployment!r}: {f}: {r}" for f, r in problems]
        FleetError.__init__(self, "\n".join(lines))
        self.key = field
        self.value = deployment
        self.reason = reason
        self.deployment = deployment
        self.problems = tuple(problems)
        self.lines = tuple(lines)


class DeploymentsError(ConfigError):
    """Raised when a set of deployments (a folder of YAML files) has problems.

    Args:
        where: the folder or source the documents came from.
        lines: every problem, each prefixed with its file (and document number in the file).
    """

    def __init__(self, where: str, lines: list[str]) -> None:
        count = f"{len(lines)} problem{'s' if len(lines) != 1 else ''}"
        FleetError.__init__(self, f"{where}: {count}:\n" + "\n".join(f"  {x}" for x in lines))
        self.key = where
        self.value = where
        self.reason = lines[0]
        self.lines = tuple(lines)


class ModelFormatError(FleetError):
    """Raised when a model's weight files cannot be read (bad safetensors header, a tensor whose
    byte range disagrees with its dtype and shape, a file size that disagrees with the header).

    Args:
        path: the file at fault.
        message: what is wrong.
    """

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


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
    "BadGateway",
    "DeploymentError",
    "DeploymentsError",
    "InvalidRequest",
    "ModelFormatError",
    "ModelNotFound",
    "NoCapacity",
    "PayloadTooLarge",
    "UpstreamError",
    "error_body",
    "render",
]
