"""The response cache's sans-I/O core: which requests may be cached, their keys, the answer
kept, a bounded LRU and Redis's backoff (docs/CACHE.md).

A request is cached only when its answer is deterministic: ``temperature`` 0, or a fixed
``seed``, and one plain answer (``n``/``best_of`` 1, no logprobs, no P/D ``kv_transfer_params``).
Its key is the SHA-256 of the normalized request: the deployment's identity (name and version,
see :func:`deployment_identity`), the endpoint, and the body with its keys sorted, vLLM's
defaults written out and the fields that do not change the answer removed (``model``: the
identity replaces it; ``stream``, ``stream_options``, ``user``, ``request_id``, ``priority``), so a
streamed request hits a non-streamed entry and vice versa. ``cache_salt`` stays in the key: a
client that salts asks to share nothing with other salts.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fleet.protocol.errors import ConfigError

#: Fields that do not change the answer: left out of the key.
IRRELEVANT = ("model", "stream", "stream_options", "user", "request_id", "priority")
#: Fields whose presence makes a request uncacheable (the answer carries more than text, or
#: belongs to a prefill/decode split).
UNCACHEABLE = ("logprobs", "top_logprobs", "prompt_logprobs", "kv_transfer_params")
#: vLLM 0.32's defaults of the sampling fields (CompletionRequest, ChatCompletionRequest).
DEFAULTS: dict[str, Any] = {
    "n": 1,
    "top_p": 1.0,
    "min_p": 0.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "stop": [],
    "stop_token_ids": [],
    "ignore_eos": False,
    "min_tokens": 0,
    "skip_special_tokens": True,
    "spaces_between_special_tokens": True,
    "include_stop_str_in_output": False,
}
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "completion": {"max_tokens": 16, "echo": False, "add_special_tokens": True},
    "chat": {
        "add_generation_prompt": True,
        "continue_final_message": False,
        "add_special_tokens": False,
        "echo": False,
    },
}
FLOATS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
          "repetition_penalty")  # fmt: skip


def ineligible(kind: str, body: Mapping[str, Any], headers: Mapping[str, str]) -> str | None:
    """Why a validated request may not be cached (a metric label), or None when it may.

    Args:
        kind: ``"completion"`` or ``"chat"``.
        body: the parsed body.
        headers: the request's headers, lower-case names.
    """
    if "no-store" in headers.get("cache-control", "").lower():
        return "no_store"
    temperature = body.get("temperature")
    seeded = isinstance(body.get("seed"), int) and not isinstance(body.get("seed"), bool)
    if temperature != 0 and not seeded:
        return "sampled"  # absent means the model's default, which samples
    for key in ("n", "best_of"):
        if body.get(key) not in (None, 1):
            return "n"
    for key in UNCACHEABLE:
        if body.get(key) is not None and body.get(key) is not False:
            return key
    return None


def normalize(kind: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """The body as the key sees it (see the module docstring); ``body`` is not changed."""
    out = {k: v for k, v in body.items() if k not in IRRELEVANT and v is not None}
    if kind == "chat":
        # vLLM's chat: max_completion_tokens wins over the older max_tokens.
        cap = out.pop("max_completion_tokens", None)
        if cap is not None:
            out["max_tokens"] = cap
    for key, value in {**DEFAULTS, **KIND_DEFAULTS[kind]}.items():
        out.setdefault(key, value)
    if isinstance(out["stop"], str):
        out["stop"] = [out["stop"]]
    for key in FLOATS:
        value = out.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def cache_key(kind: str, body: Mapping[str, Any], identity: str) -> str:
    """The key of a request to deployment ``identity`` (:func:`deployment_identity`)."""
    doc = {"endpoint": kind, "deployment": identity, "body": normalize(kind, body)}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def deployment_identity(name: str, version: str, fields: Sequence[object]) -> str:
    """A deployment's name and version: its declared ``version`` and what decides its answers
    (``fields``: model source, engine kind and arguments, context length), hashed."""
    text = json.dumps([version, *[str(f) for f in fields]], separators=(",", ":"))
    return f"{name}@{hashlib.sha256(text.encode()).hexdigest()[:16]}"


@dataclass(frozen=True)
class Answer:
    """A complete answer, as kept: one choice's text and how it ended, and the usage."""

    kind: str
    text: str
    finish_reason: str
    stop_reason: str | int | None
    prompt_tokens: int
    completion_tokens: int
    fingerprint: str | None = None

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def decode(cls, data: bytes) -> Answer:
        """An answer :meth:`encode` wrote.

        Raises:
            ValueError: not one (a foreign or older value under the key).
        """
        try:
            fields = json.loads(data)
            answer = cls(**fields)
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a cached answer: {exc}") from exc
        if not isinstance(answer.text, str) or not isinstance(answer.prompt_tokens, int):
            raise ValueError("not a cached answer: bad field types")
        return answer


class LruCache:
    """Answers by key, least recently used dropped first, bounded by count and bytes; each
    expires ``ttl_s`` after it was put (``math.inf``: never).

    Raises:
        ConfigError: a bound below 1 or a ``ttl_s`` not above 0.
    """

    def __init__(self, max_entries: int, max_bytes: int, ttl_s: float = math.inf) -> None:
        if max_entries < 1:
            raise ConfigError("response_cache_entries", max_entries, "must be >= 1")
        if max_bytes < 1:
            raise ConfigError("response_cache_bytes", max_bytes, "must be >= 1")
        if not ttl_s > 0:
            raise ConfigError("response_cache_ttl_s", ttl_s, "must be > 0")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.bytes = 0
        self._items: OrderedDict[str, tuple[bytes, float]] = OrderedDict()  # key -> (value, until)

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str, now: float) -> bytes | None:
        """The value under ``key`` (now the most recently used), or None (absent, expired)."""
        item = self._items.get(key)
        if item is None:
            return None
        if now >= item[1]:
            self._drop(key)
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: str, value: bytes, now: float) -> bool:
        """Keep ``value`` under ``key``; False when it alone is over the byte bound."""
        size = len(key) + len(value)
        if size > self.max_bytes:
            return False
        if key in self._items:
            self._drop(key)
        self._items[key] = (value, now + self.ttl_s)
        self.bytes += size
        while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._items)))
        return True

    def _drop(self, key: str) -> None:
        value, _ = self._items.pop(key)
        self.bytes -= len(key) + len(value)


@dataclass
class Backoff:
    """Whether to ask Redis now: after a failure not before ``retry_at``, the pause doubling
    from ``base_s`` up to ``max_s`` while failures go on; reset by a success."""

    base_s: float = 0.5
    max_s: float = 30.0
    up: bool = True
    retry_at: float = 0.0
    pause_s: float = 0.0

    def usable(self, now: float) -> bool:
        """Whether a call may go to Redis now (up, or its retry is due)."""
        return self.up or now >= self.retry_at

    def failed(self, now: float) -> bool:
        """A call failed; whether Redis was up until now (the caller logs that once)."""
        was_up = self.up
        self.pause_s = self.base_s if was_up else min(self.max_s, self.pause_s * 2)
        self.up = False
        self.retry_at = now + self.pause_s
        return was_up

    def ok(self) -> bool:
        """A call succeeded; whether Redis was down until now."""
        was_down = not self.up
        self.up = True
        self.pause_s = 0.0
        return was_down


__all__ = [
    "DEFAULTS",
    "IRRELEVANT",
    "UNCACHEABLE",
    "Answer",
    "Backoff",
    "LruCache",
    "cache_key",
    "deployment_identity",
    "ineligible",
    "normalize",
]
