"""Load against the coordinator's OpenAI API, each request judged (:mod:`.outcomes`).

:class:`Load` is closed-loop: ``concurrency`` workers, each sending its next request when the
last one is answered, until :meth:`Load.stop`; requests already sent are always answered or
given up by the client's timeout, never cancelled, so an outcome is the fleet's doing.
:func:`open_loop` sends at a fixed rate whatever the fleet does (the overload burst).

Requests mix ``/v1/completions`` and ``/v1/chat/completions``, streaming and not, with prompts
that share one of a few prefixes (so the KV index and prefix routing are exercised), and carry
``x-request-timeout`` so the coordinator, not the client, bounds the wait for an answer.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from fleet.protocol.errors import ConfigError

from .outcomes import Record, judge

WORDS = (
    "fleet routes prefixes to engines that hold them while breakers watch every engine and "
    "retries move requests away from failures before the first byte"
).split()


@dataclass(frozen=True)
class LoadSpec:
    """What the load sends.

    Attributes:
        model: the model name.
        concurrency: closed-loop workers.
        max_tokens: tokens asked of each request.
        stream_share: share of streaming requests (0..1).
        chat_share: share of chat requests (0..1).
        prefixes: how many shared prompt prefixes there are.
        prefix_words: words in each shared prefix.
        deadline_s: ``x-request-timeout`` sent with each request (None: not sent).
        client_timeout_s: the client's own limit on connect, and on each read.
        seed: seeds the request mix.
        tag: put in every prompt, so that two loads do not share their prompts.
        api_key: sent as ``Authorization: Bearer`` (empty: not sent).
        temperature: sent with each request (None: not sent, the model's default).
        distinct: how many different questions there are, repeated in turn (0: each request
            its own); a question keeps its endpoint, its streaming varies.

    Raises:
        ConfigError: a value out of range (the key names it).
    """

    model: str
    concurrency: int = 8
    max_tokens: int = 8
    stream_share: float = 0.5
    chat_share: float = 0.5
    prefixes: int = 8
    prefix_words: int = 48
    deadline_s: float | None = 5.0
    client_timeout_s: float = 30.0
    seed: int = 0
    tag: str = ""
    api_key: str = ""
    temperature: float | None = None
    distinct: int = 0

    def __post_init__(self) -> None:
        if self.distinct < 0:
            raise ConfigError("distinct", self.distinct, "must be >= 0")
        if self.concurrency < 1:
            raise ConfigError("concurrency", self.concurrency, "must be >= 1")
        if self.max_tokens < 1:
            raise ConfigError("max_tokens", self.max_tokens, "must be >= 1")
        for key in ("stream_share", "chat_share"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(key, getattr(self, key), "must be within 0..1")
        if self.prefixes < 1 or self.prefix_words < 0:
            raise ConfigError("prefixes", self.prefixes, "needs >= 1 prefix of >= 0 words")
        if self.deadline_s is not None and not (
            self.deadline_s > 0 and math.isfinite(self.deadline_s)
        ):
            raise ConfigError("deadline_s", self.deadline_s, "must be a number > 0 or None")
        if not self.client_timeout_s > 0:
            raise ConfigError("client_timeout_s", self.client_timeout_s, "must be > 0")


@dataclass(frozen=True)
class Planned:
    """One request to send."""

    kind: str
    path: str
    body: dict[str, Any]
    headers: dict[str, str]

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


def plan(spec: LoadSpec, index: int) -> Planned:
    """Request number ``index`` of a load (the same spec and index give the same request)."""
    question = index % spec.distinct if spec.distinct else index
    rng = random.Random(f"{spec.seed}/{question}")
    group = rng.randrange(spec.prefixes)
    prefix_rng = random.Random(f"{spec.seed}/prefix/{group}")
    prefix = " ".join(prefix_rng.choice(WORDS) for _ in range(spec.prefix_words))
    text = f"Tenant {group}: {prefix}. {spec.tag} question {question}: " + " ".join(
        rng.choice(WORDS) for _ in range(8)
    )
    stream = rng.random() < spec.stream_share
    if spec.distinct:
        stream = random.Random(f"{spec.seed}/{index}/stream").random() < spec.stream_share
    body: dict[str, Any] = {"model": spec.model, "max_tokens": spec.max_tokens, "stream": stream}
    if spec.temperature is not None:
        body["temperature"] = spec.temperature
    if rng.random() < spec.chat_share:
        kind, path = "chat", "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": text}]
    else:
        kind, path = "completion", "/v1/completions"
        body["prompt"] = text
    headers = {"authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    if spec.deadline_s is not None:
        headers["x-request-timeout"] = f"{spec.deadline_s:g}"
    return Planned(kind, path, body, headers)


def client(base_url: str, spec: LoadSpec, *, max_connections: int = 512) -> httpx.AsyncClient:
    """An HTTP client for a load against ``base_url``."""
    t = spec.client_timeout_s
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(connect=min(t, 10.0), read=t, write=t, pool=t),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=64),
    )


async def send(
    http: httpx.AsyncClient,
    request: Planned,
    clock: Callable[[], float],
    *,
    on_start: Callable[[dict[str, str]], None] | None = None,
) -> Record:
    """Send one request, read its whole answer and judge it.

    Args:
        http: the client (its base URL is the coordinator).
        request: what to send.
        clock: the run's clock (seconds).
        on_start: called with the response headers (names lower-cased) once they arrived.

    Returns:
        Its record; a client-side error is part of the record, never raised.
    """
    start = clock()
    status: int | None = None
    headers: dict[str, str] = {}
    body = bytearray()
    error = ""
    try:
        async with http.stream(
            "POST", request.path, json=request.body, headers=request.headers
        ) as response:
            status = response.status_code
            headers = {k.lower(): v for k, v in response.headers.items()}
            if on_start is not None:
                on_start(headers)
            try:
                async for chunk in response.aiter_raw():
                    body += chunk
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
    except httpx.HTTPError as exc:
        error = error or f"{type(exc).__name__}: {exc}"
    verdict = judge(status, headers, bytes(body), transport_error=error)
    return Record(
        kind=request.kind,
        stream=request.stream,
        start_s=start,
        end_s=clock(),
        status=status,
        outcome=verdict.outcome,
        detail=verdict.detail,
        pod=headers.get("x-selected-pod", ""),
        no_retry_after=status == 503 and "retry-after" not in headers,
    )


class Load:
    """Closed-loop load until :meth:`stop` (or ``limit`` requests).

    Args:
        http: the client (base URL: the coordinator).
        spec: what to send.
        clock: the run's clock.
        limit: the most requests to send (None: until stopped).

    Resource handling: :meth:`run` owns its workers; after :meth:`stop` each finishes the
    request it has sent (the client's timeout bounds that) and sends no other.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        spec: LoadSpec,
        clock: Callable[[], float],
        *,
        limit: int | None = None,
    ) -> None:
        self.http = http
        self.spec = spec
        self.clock = clock
        self.limit = limit
        self.records: list[Record] = []
        self._next = 0
        self._stopped = False
        self._progress = trio.Event()

    def stop(self) -> None:
        """Send no more requests."""
        self._stopped = True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the workers; ``started()`` once they run; return when all are done."""
        async with trio.open_nursery() as nursery:
            for _ in range(self.spec.concurrency):
                nursery.start_soon(self._worker)
            task_status.started()

    async def _worker(self) -> None:
        while not self._stopped and (self.limit is None or self._next < self.limit):
            index = self._next
            self._next += 1
            self.records.append(await send(self.http, plan(self.spec, index), self.clock))
            self._progress.set()
            self._progress = trio.Event()

    async def until(self, done: Callable[[list[Record]], bool], timeout_s: float) -> bool:
        """Wait until ``done(records)`` holds (checked after each answer); False on timeout."""
        with trio.move_on_after(timeout_s):
            while not done(self.records):
                await self._progress.wait()
            return True
        return False


def run_clock() -> Callable[[], float]:
    """A clock reading seconds since now (trio's clock)."""
    t0 = trio.current_time()
    return lambda: trio.current_time() - t0


@contextlib.asynccontextmanager
async def background(
    base_url: str, spec: LoadSpec, clock: Callable[[], float]
) -> AsyncIterator[Load]:
    """Run a :class:`Load` for the block; on leaving, stop it and wait for its answers."""
    async with client(base_url, spec) as http, trio.open_nursery() as nursery:
        load = Load(http, spec, clock)
        await nursery.start(load.run)
        try:
            yield load
        finally:
            load.stop()


async def open_loop(
    http: httpx.AsyncClient,
    spec: LoadSpec,
    clock: Callable[[], float],
    *,
    rate_rps: float,
    count: int,
    first_index: int = 0,
) -> list[Record]:
    """Send ``count`` requests at ``rate_rps`` (evenly spaced), whatever the answers; return
    their records once every one is answered or given up."""
    if not (rate_rps > 0 and count >= 0):
        raise ConfigError("rate_rps", rate_rps, "needs rate_rps > 0 and count >= 0")
    records: list[Record] = []

    async def one(index: int) -> None:
        records.append(await send(http, plan(spec, index), clock))

    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(count):
            await trio.sleep_until(t0 + i / rate_rps)
            nursery.start_soon(one, first_index + i)
    return records


__all__ = [
    "Load",
    "LoadSpec",
    "Planned",
    "background",
    "client",
    "open_loop",
    "plan",
    "run_clock",
    "send",
]
