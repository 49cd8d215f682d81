"""``POST /api/v1/route/explain`` and ``POST /api/v1/score``: the scheduling pipeline, asked.

Both take ``{"model": ..., and one of "prompt" (text), "messages" (chat), "token_ids"}``, plus
optional ``"engines"`` (ids to consider; default every routable engine of the model) and
``"headers"`` (e.g. ``{"x-session-id": ...}``). Nothing is sent to an engine and nothing is
recorded. ``explain`` runs the configured profiles with every candidate's filter results and
per-scorer scores (with a P/D config also the decider's verdict, ``pd``, and the prefill
engine, ``prefill``, with its candidates); ``score`` answers, in the spirit of llm-d's KV-cache
manager, each engine's cached prefix of the prompt: blocks present, of how many, tokens, and
score (present / total).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from .errors import InvalidRequest, ModelNotFound
from .registry import EngineView
from .router.prompt import PromptTokenizer, RoutingRequest
from .router.scheduler import Profile, Scheduler
from .validation import parse_json_object


class PrefixIndex(Protocol):
    """What ``score`` asks of the KV index."""

    def match(self, keys: Iterable[int], candidates: Iterable[str]) -> dict[str, int]: ...


@dataclass(frozen=True)
class RoutingPorts:
    """What these endpoints read, and nothing more (the HTTP layer needs no coordinator).

    Attributes:
        engines_for: ``(model, session)`` → the routable engines that may serve it.
        scheduler: the scheduling pipeline (asked to explain, never to record).
        index: the KV index (cached prefixes).
        tokenizer: tokenizes prompts as the engines will.
        inflight: requests in flight per engine (the scheduler's load input).
    """

    engines_for: Callable[[str, str | None], Sequence[EngineView]]
    scheduler: Scheduler
    index: PrefixIndex
    tokenizer: PromptTokenizer
    inflight: Callable[[str], int]


async def routing_request(
    ports: RoutingPorts, raw: bytes
) -> tuple[RoutingRequest, list[EngineView], dict[str, Any]]:
    """Parse an explain/score body into the routing request and its candidate engines.

    Raises:
        InvalidRequest: a missing or ill-typed field (400).
        ModelNotFound: no routable engine serves the model (404).
    """
    body = parse_json_object(raw)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("`model` must be a non-empty string.", param="model")
    present = [k for k in ("prompt", "messages", "token_ids") if k in body]
    if len(present) != 1:
        raise InvalidRequest(
            "Give exactly one of `prompt` (text), `messages` (chat) or `token_ids`.",
            param="prompt",
        )
    headers = body.get("headers", {})
    if not isinstance(headers, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise InvalidRequest("`headers` must map header names to strings.", param="headers")
    engines = list(ports.engines_for(model, None))
    if not engines:
        raise ModelNotFound(model)
    wanted = body.get("engines")
    if wanted is not None:
        if not isinstance(wanted, list) or not all(isinstance(e, str) for e in wanted):
            raise InvalidRequest("`engines` must be a list of engine ids.", param="engines")
        unknown = sorted(set(wanted) - {e.id for e in engines})
        if unknown:
            raise InvalidRequest(
                f"No routable engine of `{model}` is named {unknown}.", param="engines"
            )
        engines = [e for e in engines if e.id in wanted]
    request = RoutingRequest(model, headers={k.lower(): v for k, v in headers.items()})
    started = trio.current_time()
    if present == ["token_ids"]:
        ids = body["token_ids"]
        if not isinstance(ids, list) or not all(type(t) is int and t >= 0 for t in ids):
            raise InvalidRequest(
                "`token_ids` must be a list of non-negative ints.", param="token_ids"
            )
        request.token_ids = tuple(ids)
    else:
        kind = "chat" if present == ["messages"] else "completion"
        if kind == "chat" and not isinstance(body["messages"], list):
            raise InvalidRequest("`messages` must be a list.", param="messages")
        if kind == "completion" and not isinstance(body["prompt"], str | list):
            raise InvalidRequest("`prompt` must be text or a list of token ids.", param="prompt")
        request.token_ids = await ports.tokenizer.tokens(model, kind, body)
    request.tokenize_ms = (trio.current_time() - started) * 1000
    info = {
        "model": model,
        "prompt_tokens": None if request.token_ids is None else len(request.token_ids),
        "tokenize_ms": round(request.tokenize_ms, 3),
    }
    return request, engines, info


async def explain(ports: RoutingPorts, raw: bytes) -> dict[str, Any]:
    """The pipeline's decision for the request in ``raw``, with every plugin's verdict."""
    request, engines, info = await routing_request(ports, raw)
    decision = ports.scheduler.schedule(
        request, engines, ports.inflight, trio.current_time(), explain=True
    )
    config = ports.scheduler.config
    profile = config.primary
    prefill = config.prefill_profile
    return {
        **info,
        "profile": profile.name,
        "filters": [f.name for f in profile.filters],
        "scorers": [{"name": w.scorer.name, "weight": w.weight} for w in profile.scorers],
        "picker": profile.picker.name,
        "handler": config.handler.TYPE,
        # P/D: the request path sends to ``selected`` only until the split exists (issue 17)
        "prefill_profile": None if prefill is None else _describe(prefill),
        **decision.as_json(),
    }


def _describe(profile: Profile) -> dict[str, Any]:
    return {
        "name": profile.name,
        "filters": [f.name for f in profile.filters],
        "scorers": [{"name": w.scorer.name, "weight": w.weight} for w in profile.scorers],
        "picker": profile.picker.name,
    }


async def score(ports: RoutingPorts, raw: bytes) -> dict[str, Any]:
    """Each candidate engine's cached prefix of the prompt in ``raw``."""
    request, engines, info = await routing_request(ports, raw)
    out = []
    for e in engines:
        keys = request.keys(e.block_size)
        n = ports.index.match(keys, [e.id])[e.id]
        out.append(
            {
                "engine_id": e.id,
                "block_size": e.block_size,
                "blocks_present": n,
                "blocks_total": len(keys),
                "tokens": n * e.block_size,
                "score": round(n / len(keys), 4) if keys else 0.0,
            }
        )
    return {**info, "engines": out}


__all__ = ["PrefixIndex", "RoutingPorts", "explain", "score"]
