"""The prefill/decode split of one request, as llm-d's routing sidecar drives vLLM (``nixlv2``).

When the scheduler's decision names a prefill engine (:attr:`.router.scheduler.Decision.prefill`,
or an honoured ``x-prefiller-host-port``, :mod:`.prefiller`):

1. the prefill engine gets the request with ``kv_transfer_params`` asking for a remote decode
   (``do_remote_decode: true``, the remote fields null), ``stream: false``, no
   ``stream_options``, ``max_tokens: 1`` (chat: ``max_completion_tokens: 1`` too), the same
   ``x-request-id``, and at most ``prefill_share`` of the time left to the request's deadline
   (and never more than ``prefill_timeout_s``);
2. the ``kv_transfer_params`` of its answer go, verbatim, with the original request to the
   decode engine, which answers the client (streamed or not). An answer without them (a
   connector that moves KV another way, such as vLLM's ExampleConnector) sends the original
   request as it is.

A prefill that fails (refused, reset, a non-200 status, an unreadable answer) or is slow (past
its share of the deadline) falls back to decode only: the decode engine gets the original
request and computes the prompt itself, so nothing is lost. Unlike llm-d's sidecar, a 4xx from
the prefill engine is not passed to the client: the decode engine answers the request itself
(with the same error if the request is bad).

:func:`plan_prefill` and :func:`after_prefill` decide (sans-I/O, plain-call tests);
:class:`PrefillRunner` does the one HTTP exchange.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal

import trio
from opentelemetry import trace

from fleet.protocol.errors import ConfigError

from . import tracing
from .engineerrors import EngineHTTPError, EngineURLError
from .forwarded import TIMEOUT_HEADER
from .metrics import CoordinatorMetrics
from .pools import EnginePools
from .registry import EngineView
from .router.scheduler import Decision

log = logging.getLogger(__name__)

#: The prefill request's ``kv_transfer_params`` (vLLM's toy_proxy_server.py, llm-d nixlv2).
PREFILL_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
PREFILL_POD_HEADER = "x-prefill-pod"

Outcome = Literal["split", "fallback", "decode_only"]
OUTCOMES: tuple[Outcome, ...] = ("split", "fallback", "decode_only")
#: Why a split fell back: refused (nothing listens), error (reset, protocol), down (its health
#: probe failed), status (a non-200 answer), timeout (past its share), bad_answer (not JSON).
FALLBACK_REASONS = ("refused", "error", "down", "status", "timeout", "bad_answer")


@dataclass(frozen=True)
class PDConfig:
    """How long a prefill may take before the request falls back to decode only.

    Attributes:
        prefill_share: the share of the time left to the request's deadline (0 < x <= 1).
        prefill_timeout_s: the most a prefill may take (also without a deadline).

    Raises:
        ConfigError: a value out of range (names the key).
    """

    prefill_share: float = 0.5
    prefill_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.prefill_share <= 1:
            raise ConfigError("prefill_share", self.prefill_share, "must be in (0, 1]")
        if not (math.isfinite(self.prefill_timeout_s) and self.prefill_timeout_s > 0):
            raise ConfigError("prefill_timeout_s", self.prefill_timeout_s, "must be > 0")


@dataclass(frozen=True)
class PrefillCall:
    """The prefill request to send: ``body`` to ``engine``'s ``path``, answered by
    ``deadline``."""

    engine: EngineView
    path: str
    body: bytes
    deadline: float


@dataclass(frozen=True)
class PrefillAnswer:
    """How the prefill went: ``status`` and ``body`` of its answer, or ``failure`` (one of
    :data:`FALLBACK_REASONS`) when there is none."""

    status: int | None = None
    body: bytes = b""
    failure: str | None = None


@dataclass(frozen=True)
class DecodeCall:
    """What the decode engine gets, and how the split went.

    Attributes:
        body: the request body for the decode engine.
        outcome: ``split``, ``fallback`` or ``decode_only``.
        reason: why it fell back (:data:`FALLBACK_REASONS`), or a note ("" when none).
        prefill: the prefill engine that prefilled (named in ``x-prefill-pod``), or None.
    """

    body: bytes
    outcome: Outcome
    reason: str = ""
    prefill: EngineView | None = None


def prefill_body(body: Mapping[str, Any]) -> bytes:
    """The request for the prefill engine: ``body`` asking for a remote decode of one token."""
    out = {k: v for k, v in body.items() if k != "stream_options"}
    out["kv_transfer_params"] = dict(PREFILL_PARAMS)
    out["stream"] = False
    out["max_tokens"] = 1
    if "messages" in body:  # chat: vLLM reads max_completion_tokens first
        out["max_completion_tokens"] = 1
    return json.dumps(out).encode()


def decode_body(body: Mapping[str, Any], params: Mapping[str, Any]) -> bytes:
    """The request for the decode engine: ``body`` with the prefill's ``kv_transfer_params``."""
    return json.dumps({**body, "kv_transfer_params": dict(params)}).encode()


def plan_prefill(
    path: str,
    body: Mapping[str, Any],
    prefill: EngineView | None,
    decode: EngineView,
    now: float,
    deadline: float,
    cfg: PDConfig,
) -> PrefillCall | None:
    """The prefill to send first, or None (decode only: no prefill engine, it is the decode
    engine itself, or no time is left for one)."""
    if prefill is None or prefill.id == decode.id or now >= deadline:
        return None
    budget = min(cfg.prefill_timeout_s, (deadline - now) * cfg.prefill_share)
    return PrefillCall(prefill, path, prefill_body(body), now + budget)


def after_prefill(
    call: PrefillCall | None, answer: PrefillAnswer, body: Mapping[str, Any], raw: bytes
) -> DecodeCall:
    """What the decode engine gets after the prefill ``call`` answered ``answer`` (``raw``:
    the client's body bytes, sent as they are when nothing is added)."""
    if call is None:
        return DecodeCall(raw, "decode_only")
    if answer.failure is not None:
        return DecodeCall(raw, "fallback", answer.failure)
    if answer.status != 200:
        return DecodeCall(raw, "fallback", "status")
    try:
        parsed = json.loads(answer.body)
    except ValueError:
        return DecodeCall(raw, "fallback", "bad_answer")
    params = parsed.get("kv_transfer_params") if isinstance(parsed, dict) else None
    if not isinstance(params, dict):
        # The engine's connector moves KV without params (ExampleConnector), or it has none.
        return DecodeCall(raw, "split", "no kv_transfer_params", call.engine)
    return DecodeCall(decode_body(body, params), "split", "", call.engine)


class PrefillRunner:
    """Sends prefill requests (the I/O of a split).

    Args:
        pools: the engines' clients.
        watching: a cancel scope that ends when the engine is found down.
        acquire: counts a request in flight on an engine; returns its release.
    """

    def __init__(
        self,
        pools: EnginePools,
        watching: Callable[[str], AbstractContextManager[trio.CancelScope]],
        acquire: Callable[[str], Callable[[], None]],
    ) -> None:
        self._pools = pools
        self._watching = watching
        self._acquire = acquire

    async def run(self, call: PrefillCall, headers: Mapping[str, str]) -> PrefillAnswer:
        """Send ``call``; its answer, or why there is none. Never raises for the engine's
        failures (cancellation passes)."""
        upstream = tracing.inject(dict(headers), trace.get_current_span())
        left = max(call.deadline - trio.current_time(), 0.001)
        upstream[TIMEOUT_HEADER] = f"{left:.3f}"
        release = self._acquire(call.engine.id)
        try:
            with trio.move_on_at(call.deadline) as scope, self._watching(call.engine.id) as down:
                client = self._pools.get(call.engine.url)
                response = await client.request("POST", call.path, upstream, call.body)
                try:
                    data = b"".join([chunk async for chunk in response.aiter_raw()])
                finally:
                    response.close()
        except EngineHTTPError as exc:
            known = exc.reason in ("refused", "timeout")
            return PrefillAnswer(failure=exc.reason if known else "error")
        except EngineURLError:
            return PrefillAnswer(failure="error")
        finally:
            release()
        if down.cancelled_caught:
            return PrefillAnswer(failure="down")
        if scope.cancelled_caught:
            return PrefillAnswer(failure="timeout")
        return PrefillAnswer(response.status, data)


class Splitter:
    """Splits requests: decides with :func:`plan_prefill` and :func:`after_prefill`, prefills
    with the runner, counts outcomes (``fleet_pd_requests_total``, ``fleet_pd_fallbacks_total``).

    Args:
        cfg: the prefill's time budget.
        runner: sends prefills.
        metrics: where outcomes are counted.
        failed: told ``(engine id, reason)`` when a prefill engine fails (its breaker).
    """

    def __init__(
        self,
        cfg: PDConfig,
        runner: PrefillRunner,
        metrics: CoordinatorMetrics,
        failed: Callable[[str, str], None],
    ) -> None:
        self.cfg = cfg
        self.runner = runner
        self.metrics = metrics
        self.failed = failed

    async def split(
        self,
        path: str,
        body: Mapping[str, Any],
        raw: bytes,
        decision: Decision,
        prefiller: EngineView | None,
        headers: Mapping[str, str],
        deadline: float,
    ) -> DecodeCall:
        """Prefill when ``decision`` (or ``prefiller``, the client's honoured choice) names a
        prefill engine; what the decode engine (``decision.engine``) gets. A request without
        a P/D decider or a prefiller is not counted."""
        assert decision.engine is not None
        if decision.pd is None and prefiller is None:
            return DecodeCall(raw, "decode_only")
        now = trio.current_time()
        target = prefiller or decision.prefill
        call = plan_prefill(path, body, target, decision.engine, now, deadline, self.cfg)
        attributes = {"fleet.engine.id": call.engine.id} if call is not None else {}
        with tracing.span("fleet.prefill", attributes) as span:
            answer = PrefillAnswer() if call is None else await self.runner.run(call, headers)
            out = after_prefill(call, answer, body, raw)
            span.set_attributes({"fleet.pd.outcome": out.outcome, "fleet.pd.reason": out.reason})
        self.metrics.pd_requests.labels(outcome=out.outcome).inc()
        if out.outcome == "fallback" and call is not None:
            self.metrics.pd_fallbacks.labels(reason=out.reason).inc()
            if out.reason != "status" or (answer.status or 0) >= 500:  # not the engine's 4xx
                self.failed(call.engine.id, out.reason)
            log.warning(
                "prefill on %s failed (%s, status %s): decode only on %s",
                call.engine.id, out.reason, answer.status, decision.engine.id,
            )  # fmt: skip
        return out


__all__ = [
    "FALLBACK_REASONS",
    "OUTCOMES",
    "PREFILL_PARAMS",
    "PREFILL_POD_HEADER",
    "DecodeCall",
    "Outcome",
    "PDConfig",
    "PrefillAnswer",
    "PrefillCall",
    "PrefillRunner",
    "Splitter",
    "after_prefill",
    "decode_body",
    "plan_prefill",
    "prefill_body",
]
