"""API keys: who may call the OpenAI API, at which priority, and how often.

Without a keys file the API is open, as vLLM's is without ``--api-key``: any key or none, and
``x-priority`` picks the class. With ``--api-keys FILE`` every ``/v1/*`` request needs
``Authorization: Bearer KEY`` naming a listed key, else 401 (OpenAI's ``invalid_api_key``). A
key's tier is its requests' priority class and the most urgent one it may ask for: a
``x-priority`` header may lower a request below its tier, never raise it. A key with a rate limit
gets a token bucket (``requests_per_s``, ``burst``); past it, 429 with ``Retry-After``
(OpenAI's ``rate_limit_exceeded``), counted in ``fleet_requests_rate_limited_total{key}``. The
limit is the fleet's, whichever coordinators serve the key (:mod:`.sharedlimits`).

The file (YAML or JSON)::

    keys:
      - name: search-team          # shown in metrics and logs, never the key itself
        key: sk-fleet-1f2e...      # or key_sha256: <hex digest>, so the file holds no secret
        tier: high                 # critical | high | standard (default) | batch
        requests_per_s: 20         # optional: no limit without it
        burst: 40                  # optional: default max(1, requests_per_s)

Health, metrics and status routes (``/healthz``, ``/readyz``, ``/metrics``,
``/api/v1/engines``, ``/api/v1/nodes``) stay open; ``/admin/*`` and the KV/cache inspection
routes take the admin key instead (docs/SECURITY.md).
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fleet.protocol.errors import ConfigError

from .admission import PRIORITIES
from .errors import ApiError


class Unauthorized(ApiError):
    """Raised when a request has no valid API key (401)."""

    status = 401

    def __init__(self, message: str) -> None:
        super().__init__(message, code="invalid_api_key")


class RateLimited(ApiError):
    """Raised when a key is over its rate limit (429, with ``Retry-After``)."""

    status = 429
    type = "requests"

    def __init__(self, name: str, retry_after_s: int) -> None:
        super().__init__(
            f"Rate limit reached for API key `{name}`; retry after {retry_after_s} s.",
            code="rate_limit_exceeded",
            retry_after_s=retry_after_s,
        )
        self.key_name = name


@dataclass(frozen=True)
class ApiKey:
    """One key's identity, tier and (optional) rate limit; :mod:`.sharedlimits` keeps its
    bucket."""

    name: str
    digest: bytes  # sha256 of the key
    tier: int = PRIORITIES["standard"]
    requests_per_s: float | None = None
    burst: float = 1.0


class ApiKeys:
    """The listed keys (none: the API is open).

    Args:
        keys: the keys; their names must be unique.
    """

    def __init__(self, keys: list[ApiKey] | None = None) -> None:
        self.keys = list(keys or [])
        self._by_digest = {k.digest: k for k in self.keys}

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def check(self, headers: Mapping[str, str]) -> ApiKey | None:
        """The request's key (None when the API is open); its rate limit is not checked here.

        Raises:
            Unauthorized: no key, or one not listed.
        """
        if not self.keys:
            return None
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized(
                "Missing API key: send `Authorization: Bearer <key>` (this fleet requires one)."
            )
        digest = hashlib.sha256(token.strip().encode()).digest()
        key = self._by_digest.get(digest)
        if key is None or not hmac.compare_digest(key.digest, digest):
            raise Unauthorized("Incorrect API key provided.")
        return key


def load_api_keys(path: str | Path) -> ApiKeys:
    """Read a keys file (see the module docstring).

    Raises:
        ConfigError: unreadable, or a bad entry (the key names the entry and field).
    """
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError("--api-keys", str(path), f"cannot read it: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list) or not data["keys"]:
        raise ConfigError("--api-keys", str(path), "needs a non-empty `keys:` list")
    keys: list[ApiKey] = []
    names: set[str] = set()
    for i, entry in enumerate(data["keys"]):
        keys.append(_key(entry, f"keys[{i}]"))
        if keys[-1].name in names:
            raise ConfigError(f"keys[{i}].name", keys[-1].name, "is used twice")
        names.add(keys[-1].name)
    if len({k.digest for k in keys}) != len(keys):
        raise ConfigError("--api-keys", str(path), "lists the same key twice")
    return ApiKeys(keys)


def _key(entry: Any, where: str) -> ApiKey:
    if not isinstance(entry, dict):
        raise ConfigError(where, entry, "must be a map")
    unknown = set(entry) - {"name", "key", "key_sha256", "tier", "requests_per_s", "burst"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}", "?", "unknown field")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.name", name, "must be a non-empty string")
    if ("key" in entry) == ("key_sha256" in entry):
        raise ConfigError(where, name, "needs exactly one of `key` and `key_sha256`")
    if "key" in entry:
        secret = entry["key"]
        if not isinstance(secret, str) or len(secret) < 8:
            raise ConfigError(f"{where}.key", "…", "must be a string of 8 characters or more")
        digest = hashlib.sha256(secret.encode()).digest()
    else:
        try:
            digest = bytes.fromhex(str(entry["key_sha256"]))
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ConfigError(f"{where}.key_sha256", "…", "must be 64 hex digits")
    tier = entry.get("tier", "standard")
    if tier not in PRIORITIES:
        raise ConfigError(f"{where}.tier", tier, f"must be one of {list(PRIORITIES)}")
    rate = entry.get("requests_per_s")
    if rate is not None and (
        type(rate) not in (int, float) or not math.isfinite(rate) or rate <= 0
    ):
        raise ConfigError(f"{where}.requests_per_s", rate, "must be a number > 0")
    burst = entry.get("burst", max(1.0, float(rate or 1)))
    if type(burst) not in (int, float) or not math.isfinite(burst) or burst < 1:
        raise ConfigError(f"{where}.burst", burst, "must be a number >= 1")
    if "burst" in entry and rate is None:
        raise ConfigError(f"{where}.burst", burst, "needs requests_per_s")
    return ApiKey(
        name=name,
        digest=digest,
        tier=PRIORITIES[tier],
        requests_per_s=float(rate) if rate is not None else None,
        burst=float(burst),
    )


__all__ = ["ApiKey", "ApiKeys", "RateLimited", "Unauthorized", "load_api_keys"]
