"""Calls to engines: open a response, count it in flight, end the waits on an engine found down.

This is I/O with no decisions in it: which engine to try, and what an outcome means for it, are
:mod:`.attempts`' and :mod:`.enginehealth`'s. :meth:`EngineCalls.attempt` opens a request on an
engine within the request's deadline and reports the outcome the plan records; while it (or a
stream's wait for its next chunk, :meth:`EngineCalls.watching`) waits, the engine being put down
ends the wait at once.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator

import trio
from opentelemetry.trace import SpanKind, Status, StatusCode

from . import tracing
from .admission import WaitEstimate
from .attempts import CONNECTED, PAST_DEADLINE, Failed, Outcome, Refused
from .engineerrors import EngineHTTPError, EngineTimeout, EngineURLError
from .enginehealth import EngineHealth
from .errors import BadGateway, UpstreamError
from .forwarded import HOP_BY_HOP, Forwarded
from .loopsweep import LoopSweep
from .metrics import CoordinatorMetrics
from .picker import InflightCounter
from .pools import EnginePools
from .registry import EngineView
from .streamwatch import StreamWatch, StreamWatches
from .validation import ParsedRequest

log = logging.getLogger(__name__)


class EngineCalls:
    """Opens requests on engines and keeps what the calls share.

    Owns the in-flight counts (per engine, and per model per engine), the cancel scopes of the
    waits on each engine (ended when :class:`.EngineHealth` puts the engine down: it is this
    object's ``on_down``) and the first-byte wait estimates. Nothing to stop.

    Args:
        pools: the clients of each engine.
        metrics: where counts go.
        health: the engines' health; its ``on_down`` is set to :meth:`cancel_waits`.
        inflight: the per-engine in-flight counter (the health's ``inflight`` reads it).
        streaming: the per-engine counter of streamed requests in flight (the health's
            ``streaming`` reads it).
        clock: times engine calls (ttfb).
    """

    def __init__(
        self,
        pools: EnginePools,
        metrics: CoordinatorMetrics,
        health: EngineHealth,
        inflight: InflightCounter,
        streaming: InflightCounter,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.pools = pools
        self.metrics = metrics
        self.health = health
        self.inflight = inflight
        self.streaming = streaming
        self.clock = clock
        # served name -> engine -> its requests in flight there (slots held off routing)
        self.by_model: dict[str, InflightCounter] = {}
        self._waits: dict[str, set[trio.CancelScope]] = {}  # cancelled when the engine is down
        self.streams = StreamWatches()  # started streams' waits (also ended when it is down)
        self._watchdog = LoopSweep(
            "fleet stream watchdog", lambda: self.streams.tick_s, self._end_overdue
        )
        # (model, stream) -> the wait for a response's first byte: a request whose deadline is
        # closer than its bound when it leaves the queue is shed, not sent
        self.first_byte: dict[tuple[str, bool], WaitEstimate] = {}
        health.on_down = self.cancel_waits

    @contextlib.contextmanager
    def watching(self, engine_id: str) -> Iterator[trio.CancelScope]:
        """A cancel scope that ends when the engine is put down: a wait on the engine (for a
        first byte, for a stream's next one) that ends if the engine is found dead."""
        scope = trio.CancelScope()
        waits = self._waits.get(engine_id)
        if waits is None:
            waits = self._waits[engine_id] = set()
        waits.add(scope)
        try:
            with scope:
                yield scope
        finally:
            waits.discard(scope)

    def watch_stream(self, engine_id: str, idle_s: float, abort: Callable[[], None]) -> StreamWatch:
        """Watch a started stream's waits on ``engine_id`` (:meth:`next_chunk`): one of
        ``idle_s``, or the engine put down, ends it with ``abort``. :meth:`unwatch` it after."""
        watch = StreamWatch(engine_id, idle_s, abort)
        self.streams.add(watch)
        self._watchdog.start()  # one per event loop, from the first stream
        return watch

    def unwatch(self, watch: StreamWatch) -> None:
        """The stream ended: stop watching it."""
        self.streams.remove(watch)

    async def next_chunk(self, watch: StreamWatch, body: AsyncIterator[bytes]) -> bytes | str:
        """A stream's next chunk, or why none came: its end, no byte for ``idle_s``, or its
        engine put down. The watchdog times the wait (:mod:`.streamwatch`: no cancel scope
        per chunk)."""
        watch.since = trio.current_time()
        try:
            return await body.__anext__()
        except StopAsyncIteration:
            return watch.why or "the stream ended without [DONE]"
        finally:
            watch.since = None

    def _end_overdue(self, now: float) -> None:
        """End the streams' waits past their ``idle_s`` (the watchdog's sweep)."""
        for watch in self.streams.overdue(now):
            watch.end(f"no byte for {watch.idle_s:g} s")

    def cancel_waits(self, engine_id: str, why: str) -> None:
        """End every wait on ``engine_id`` (it is down), so requests not answered yet are
        retried elsewhere and started streams resumed."""
        waits = self._waits.get(engine_id, set())
        streams = self.streams.waiting(engine_id)
        log.warning(
            "engine %s down (%s): %d waiting requests moved",
            engine_id,
            why,
            len(waits) + len(streams),
        )
        for scope in list(waits):
            scope.cancel()
        for watch in streams:
            watch.end("its engine was found down (a failed probe, or a stall)")

    def forget(self, keep: set[str]) -> None:
        """Drop the wait lists of engines that left (``keep``: the known ones)."""
        for engine_id in [e for e in self._waits if e not in keep and not self._waits[e]]:
            del self._waits[engine_id]
        self.streams.forget(keep)

    def hold(
        self, engine_id: str, model: str | None = None, *, stream: bool = False
    ) -> Callable[[], None]:
        """Count a request in flight on ``engine_id`` (and against ``model``'s slots there;
        ``stream``: a streamed one); returns its release (idempotent)."""
        self.health.busy(engine_id, trio.current_time(), stream=stream)
        self.inflight.acquire(engine_id)
        if stream:
            self.streaming.acquire(engine_id)
        by_engine = None
        if model is not None:
            by_engine = self.by_model.get(model)
            if by_engine is None:
                by_engine = self.by_model[model] = InflightCounter()
            by_engine.acquire(engine_id)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.inflight.release(engine_id)
                if stream:
                    self.streaming.release(engine_id)
                if by_engine is not None:
                    by_engine.release(engine_id)

        return release

    async def attempt(
        self,
        engine: EngineView,
        path: str,
        raw: bytes,
        headers: dict[str, str],
        request: ParsedRequest,
        request_id: str,
        deadline: float,
    ) -> tuple[Outcome, Forwarded | None]:
        """Open ``raw`` on ``engine`` unless ``deadline`` passes or the engine is put down
        first: the outcome, with the response when the engine answered (a 5xx is
        :class:`.Failed` with its status; anything below 500 is :data:`.CONNECTED`)."""
        # One cancel scope for every end of the wait: the deadline, the read timeout (the
        # engine client sets no timer of its own for the head: ``timed``), or the engine put
        # down. (The read timeout runs from here, not from the request's last byte sent:
        # what comes before, a free connection slot and a connection, is bounded apart.)
        read_s = self.pools.timeouts.read_s
        read_by = trio.current_time() + read_s
        scope = trio.CancelScope(deadline=min(deadline, read_by))
        waits = self._waits.get(engine.id)
        if waits is None:
            waits = self._waits[engine.id] = set()
        waits.add(scope)
        try:
            with scope:
                forwarded = await self.open(
                    engine, path, raw, headers, request, request_id, timed=True
                )
        except UpstreamError as exc:
            log.warning("%s", exc)
            if exc.reason == "refused":
                return Refused(str(exc)), None
            return Failed(exc.reason, str(exc)), None
        finally:
            waits.discard(scope)
        if scope.cancelled_caught:
            now = trio.current_time()
            if now >= deadline:
                return PAST_DEADLINE, None
            if now >= read_by:  # as the engine client's own read timer reports it
                detail = f"engine {engine.id}: EngineTimeout: {EngineTimeout('read', read_s)}"
                log.warning("%s", detail)
                return Failed("timeout", detail), None
            log.warning("engine %s: stopped answering (health probe)", engine.id)
            return Failed("down", f"engine {engine.id}: stopped answering (health probe)"), None
        if forwarded.status >= 500:
            detail = f"engine {engine.id} answered {forwarded.status}"
            return Failed("5xx", detail, forwarded.status), forwarded
        return CONNECTED, forwarded

    async def open(
        self,
        engine: EngineView,
        path: str,
        raw: bytes,
        headers: dict[str, str],
        request: ParsedRequest,
        request_id: str,
        *,
        timed: bool = False,
    ) -> Forwarded:
        """Send ``raw`` to ``engine`` and open its response, counted in flight until its body
        is read or discarded. ``timed``: the caller's cancel scope bounds the wait for the
        response's head (:meth:`.EngineClient.request`).

        Raises:
            UpstreamError: the engine could not be reached or broke before answering.
        """
        call = tracing.start(
            "fleet.engine_call",
            {"fleet.engine.id": engine.id, "url.full": engine.url + path},
            kind=SpanKind.CLIENT,
        )
        headers = tracing.inject(headers, call)
        unhold = self.hold(engine.id, request.model, stream=request.stream)
        end_call = tracing.ender(call)

        def release() -> None:  # the engine's slot, and the call's span: once, when it is done
            unhold()
            end_call()

        started = self.clock()
        try:
            client = self.pools.get(engine.url)
            response = await client.request("POST", path, headers, raw, timed=timed)
        except (EngineHTTPError, EngineURLError) as exc:
            call.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            release()
            # refused: nothing listens (or the host refused), the engine is gone
            reason = exc.reason if isinstance(exc, EngineHTTPError) else "connect"
            raise UpstreamError(engine.id, f"{type(exc).__name__}: {exc}", reason) from exc
        except BaseException:
            release()
            raise
        took = self.clock() - started
        call.set_attribute("http.response.status_code", response.status)
        self.metrics.first_byte(request.model, took)
        if response.status == 200:
            key = (request.model, request.stream)
            estimate = self.first_byte.get(key)
            if estimate is None:
                estimate = self.first_byte[key] = WaitEstimate()
            estimate.record(took)
        progress, now = self.health.progress, trio.current_time
        progress[engine.id] = now()
        out_headers = {k: v for k, v in response.headers if k not in HOP_BY_HOP}
        out_headers["x-request-id"] = request_id
        out_headers["x-selected-pod"] = engine.id
        engine_id = engine.id
        aborted = False  # ended by a stream's watchdog: no engine error to report

        def abort() -> None:
            nonlocal aborted
            aborted = True
            response.abort()

        async def body(timed: bool = False) -> AsyncIterator[bytes]:
            # Read to the body's end (a stream's chunked terminator included), so that the
            # connection goes back to the engine's pool; stopped early, it is closed.
            try:
                while (chunk := await response.next_piece(timed=timed)) is not None:
                    progress[engine_id] = now()
                    yield chunk
            except EngineHTTPError as exc:
                # The stream broke after it started; the stream relay resumes it.
                if not aborted:
                    self.metrics.upstream_errors.labels(engine=engine_id).inc()
                    log.warning("engine %s broke a response mid-way: %s", engine_id, exc)
            finally:
                release()
                response.close()

        async def read() -> bytes:
            try:
                data = await response.read_all()
            except EngineHTTPError as exc:
                self.metrics.upstream_errors.labels(engine=engine_id).inc()
                log.warning("engine %s broke a response mid-way: %s", engine_id, exc)
                raise BadGateway(
                    f"The engine broke its response before it ended ({exc}); retry."
                ) from exc
            finally:
                release()
                response.close()
            progress[engine_id] = now()
            return data

        async def discard() -> None:
            release()
            response.close()

        return Forwarded(
            response.status,
            out_headers,
            body(),
            engine,
            discard,
            read,
            lambda: body(timed=True),
            response.buffered,
            response.ready,
            abort,
        )


__all__ = ["EngineCalls"]
