"""Relay a started stream to the client, continuing it on another engine if its engine breaks it.

The I/O half of mid-stream resume: the rewriting is :mod:`.resume`'s, and which engine continues
(and whether any may) is the request's :class:`.AttemptPlan`'s. The client's stream ends well
formed whatever happens: with the answer, or with an error event and ``[DONE]``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

import trio

from . import tracing
from .attempts import CONNECTED, AttemptPlan, Broken, Failed, GiveUp, Outcome, Wait
from .enginecalls import EngineCalls
from .forwarded import TIMEOUT_HEADER, Forwarded, is_sse, read_to_end
from .metrics import CoordinatorMetrics
from .registry import EngineView
from .resume import (
    DONE,
    Progress,
    Rewriter,
    SseSplitter,
    closing_events,
    continuation,
    error_event,
)
from .router.prompt import PromptTokenizer
from .validation import ParsedRequest

log = logging.getLogger(__name__)


class StreamRelay:
    """Relays streams, resuming broken ones (one per gateway; nothing to stop).

    Args:
        calls: opens continuations on engines, and watches engines while a stream waits.
        tokenizer: counts what was generated before a break, and the prompt's tokens.
        metrics: where resumes and engine errors are counted.
        idle_s: a stream silent this long is broken (``stream_idle_s``).
    """

    def __init__(
        self,
        calls: EngineCalls,
        tokenizer: PromptTokenizer,
        metrics: CoordinatorMetrics,
        idle_s: float,
    ) -> None:
        self.calls = calls
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.idle_s = idle_s

    async def relay(
        self,
        plan: AttemptPlan,
        engine: EngineView,
        body: AsyncIterator[bytes],
        ready: Callable[[], bool],
        abort: Callable[[], None],
        path: str,
        request: ParsedRequest,
        headers: dict[str, str],
    ) -> AsyncIterator[bytes]:
        """Relay ``body``, the stream ``engine`` started (its :attr:`.Forwarded.timed_body`:
        each wait is bounded here, by ``idle_s``, and ended with ``abort``,
        :attr:`.Forwarded.abort`), event by event (``ready``: whether its next
        piece is here, :attr:`.Forwarded.ready`); if the engine breaks
        it (an error, the end without ``[DONE]``, or silence for ``idle_s``), continue it as
        ``plan`` says (:mod:`.resume`). ``headers``: what the engine got (a continuation gets
        them too)."""
        calls, next_chunk = self.calls, self.calls.next_chunk
        progress = Progress(request.kind)
        rewriter: Rewriter | None = None
        while True:
            watch = calls.watch_stream(engine.id, self.idle_s, abort)
            splitter = SseSplitter()
            sent: list[bytes] = []  # the first stream's events, parsed only if it breaks
            why = ""
            try:
                while True:
                    chunk = await next_chunk(watch, body)
                    if isinstance(chunk, str):
                        why = chunk
                        break
                    # One engine chunk, one piece for the client (one socket write).
                    outs: list[bytes] = []
                    done = False
                    for event in splitter.feed(chunk):
                        out = event if rewriter is None else rewriter.rewrite(event)
                        if rewriter is None:
                            sent.append(event)
                        if out is not None:
                            outs.append(out)
                        if event.startswith(DONE):
                            done = True
                            break
                    if outs:
                        yield outs[0] if len(outs) == 1 else b"".join(outs)
                    if done:
                        await read_to_end(body, ready)
                        return
            finally:
                calls.unwatch(watch)
                aclose = getattr(body, "aclose", None)
                # (a body read to its end has nothing left to close: no shielded scope)
                if aclose is not None and getattr(body, "ag_frame", True) is not None:
                    with trio.CancelScope(shield=True):
                        await aclose()
            # The engine broke the stream: count it, then find the rest elsewhere.
            plan.record(Broken(why), trio.current_time())
            self.metrics.upstream_errors.labels(engine=engine.id).inc()
            progress.absorb_events(sent)
            log.warning("engine %s broke a stream (%s); resuming it", engine.id, why)
            with tracing.span("fleet.resume", {"fleet.engine.id": engine.id}) as span:
                nxt = await self._continue(plan, path, request, headers, progress)
                span.set_attribute(
                    "fleet.resume.outcome", "ended" if isinstance(nxt, list) else nxt[0].engine.id
                )
            if isinstance(nxt, list):
                for event in nxt:
                    yield event
                return
            forwarded, rewriter = nxt
            engine, body, ready = forwarded.engine, forwarded.timed_body(), forwarded.ready
            abort = forwarded.abort

    async def _continue(
        self,
        plan: AttemptPlan,
        path: str,
        request: ParsedRequest,
        headers: dict[str, str],
        progress: Progress,
    ) -> tuple[Forwarded, Rewriter] | list[bytes]:
        """Open the continuation of a broken stream where ``plan`` says: the opened response
        with its rewriter, or the events that end the client's stream."""
        model, routing = request.model, plan.routing
        tokenizer = await self.tokenizer.tokenizer(model)
        counted = await self.tokenizer.count(model, progress.text) if progress.text else None
        generated = progress.chunks if counted is None else counted
        if routing.token_ids is None and tokenizer is not None:
            routing.token_ids = await self.tokenizer.tokens(model, request.kind, request.body)
        prompt_tokens = len(routing.token_ids) if routing.token_ids is not None else None

        def end(outcome: str, message: str) -> list[bytes]:
            self.metrics.stream_resumes.labels(outcome=outcome).inc()
            log.warning("stream of %s not resumed: %s", model, message)
            return [error_event(message), DONE + b"\n\n"]

        if progress.finish_reason is not None:  # complete; only the end was lost
            self.metrics.stream_resumes.labels(outcome="completed").inc()
            usage = _owed_usage(request, progress, prompt_tokens, generated)
            return closing_events(progress, finish_reason=None, usage=usage)
        body = continuation(request.kind, request.body, progress, generated)
        if isinstance(body, str):
            if body == "budget spent":
                self.metrics.stream_resumes.labels(outcome="completed").inc()
                usage = _owed_usage(request, progress, prompt_tokens, generated)
                return closing_events(progress, finish_reason="length", usage=usage)
            return end("unresumable", f"The engine serving this stream failed ({body} cannot "
                       "be continued elsewhere); retry the request.")  # fmt: skip
        raw = json.dumps(body).encode()
        upstream = dict(headers)
        request_id = upstream.get("x-request-id", "")
        while True:
            now = trio.current_time()
            step = plan.next(now)
            if isinstance(step, GiveUp):
                assert step.error is not None  # a continuation's own answer never goes out
                return end(step.why, step.error.message)
            assert not isinstance(step, Wait)  # continuations do not back off
            engine = step.engine
            if plan.timeout_s is not None:
                upstream[TIMEOUT_HEADER] = f"{max(plan.deadline - now, 0.001):.3f}"
            outcome: Outcome
            outcome, forwarded = await self.calls.attempt(
                engine, path, raw, upstream, request, request_id, plan.deadline
            )
            if forwarded is not None and not (
                outcome is CONNECTED and forwarded.status == 200 and is_sse(forwarded)
            ):
                await forwarded.discard()
                if forwarded.status < 500:  # the continuation itself was refused
                    outcome = Failed("refused", status=forwarded.status, retryable=False)
            plan.record(outcome, trio.current_time())
            if outcome is CONNECTED:
                assert forwarded is not None
                self.metrics.stream_resumes.labels(outcome="resumed").inc()
                log.info("stream of %s resumed on %s", model, engine.id)
                return forwarded, Rewriter(
                    progress, prompt_tokens, generated, request.include_usage
                )
            if not (isinstance(outcome, Failed) and not outcome.retryable):
                self.metrics.upstream_errors.labels(engine=engine.id).inc()


def _owed_usage(
    request: ParsedRequest,
    progress: Progress,
    prompt_tokens: int | None,
    generated: int,
) -> dict[str, int] | None:
    """The usage chunk a client asked for and did not get yet."""
    if not request.include_usage or progress.usage_sent or prompt_tokens is None:
        return None
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": generated,
        "total_tokens": prompt_tokens + generated,
    }


__all__ = ["StreamRelay"]
