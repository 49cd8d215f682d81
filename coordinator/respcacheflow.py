"""The response cache on the request path: look up before routing, store after a complete
success (docs/CACHE.md).

:class:`CachedInference` wraps the inference routes' forward (:mod:`.fastroutes`). A request
:func:`.respcache.ineligible` rejects goes on as before. For any other, the deployment that will
serve it is found the way routing finds it (:mod:`.versions`: sticky by session, by
``x-request-id`` otherwise, which is set here when the client sent none, so routing picks the
same version), and its key looked up: a hit is answered here (200, a body or a replayed stream,
``x-cache-hit: true``), a miss is forwarded and its answer kept once it ended well, under the
key of the deployment that actually served it (``x-selected-pod``'s owner). A streamed miss
whose client did not ask for usage is sent on with ``stream_options.include_usage`` (an answer
is kept with its usage) and the usage chunk is dropped from the client's stream.
``Cache-Control: no-cache`` skips the lookup, ``no-store`` the cache. Every response of a
cache-enabled coordinator's inference routes carries ``x-cache-hit``.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

from .deploybook import DeploymentBook
from .deployment import Deployment
from .fastroutes import Forward, Reply
from .placement import Placer
from .registry import EngineView
from .respcache import Answer, cache_key, deployment_identity, ineligible
from .respcachestore import ResponseCache
from .respreplay import StreamTap, answer_from_body, render_body, render_stream
from .traffic import pick_version
from .validation import ParsedRequest
from .versions import session_key

HIT = "x-cache-hit"


class Identities:
    """Deployment identities (:func:`.respcache.deployment_identity`) for keys.

    Args:
        placer: the deployments and which engine belongs to which.
        book: the declared FleetModels (their ``version``).
        routable: the routable engines now.
    """

    def __init__(
        self, placer: Placer, book: DeploymentBook, routable: Callable[[], list[EngineView]]
    ) -> None:
        self.placer = placer
        self.book = book
        self.routable = routable

    def of(self, deployment: Deployment) -> str:
        declared = self.book.get(deployment.name)
        version = declared[1].version if declared is not None else ""
        fields = (deployment.model_path, deployment.kind, deployment.extra_args,
                  deployment.max_model_len)  # fmt: skip
        return deployment_identity(deployment.name, version, fields)

    def for_request(self, model: str, session: str) -> str | None:
        """The identity of the deployment a request for ``model`` will go to (as
        :func:`.versions.engines_for` picks it); the served name itself when no deployment
        serves it but an engine does; None when nothing serves it."""
        versions = self.placer.serving(model)
        if not versions:
            return model if any(e.model == model for e in self.routable()) else None
        names = {d.name for d in versions}
        live_names = {
            owner.name
            for e in self.routable()
            if (owner := self.placer.owner(e.id)) is not None and owner.name in names
        }
        live = [d for d in versions if d.name in live_names] or versions
        picked = live[0] if len(live) == 1 else pick_version(live, session)
        return self.of(picked if picked is not None else live[0])

    def of_engine(self, engine_id: str, model: str) -> str:
        """The identity of the deployment engine ``engine_id`` belongs to."""
        owner = self.placer.owner(engine_id)
        return self.of(owner) if owner is not None else model


class CachedInference:
    """The cache around the inference routes' forward (module docstring).

    Args:
        cache: the answers.
        identities: finds the deployment a request goes to.
    """

    def __init__(self, cache: ResponseCache, identities: Identities) -> None:
        self.cache = cache
        self.identities = identities

    async def serve(
        self,
        parsed: ParsedRequest,
        raw: bytes,
        headers: dict[str, str],
        forward: Forward,
    ) -> Reply:
        """Answer ``parsed`` from the cache, or ``forward`` it and keep its answer.

        Raises:
            ApiError: what ``forward`` raises.
        """
        why = ineligible(parsed.kind, parsed.body, headers)
        if why is not None:
            self.cache.metrics.skipped.labels(reason=why).inc()
            return _marked(await forward(parsed, raw), hit=False)
        request_id = headers.setdefault("x-request-id", f"fleet-{uuid.uuid4().hex}")
        identity = self.identities.for_request(parsed.model, session_key(headers, request_id))
        if identity is None:
            return _marked(await forward(parsed, raw), hit=False)  # routing says why
        key = cache_key(parsed.kind, parsed.body, identity)
        if "no-cache" not in headers.get("cache-control", "").lower():
            answer = await self.cache.get(key)
            if answer is not None:
                return _hit(answer, parsed, request_id)
        drop_usage = parsed.stream and not parsed.include_usage
        if drop_usage:
            parsed, raw = _with_usage(parsed)
        reply = _marked(await forward(parsed, raw), hit=False)
        if reply.status != 200:
            return reply
        engine = reply.headers.get("x-selected-pod")
        if engine:
            served = self.identities.of_engine(engine, parsed.model)
            if served != identity:
                key = cache_key(parsed.kind, parsed.body, served)
        if reply.stream is None:
            answer = answer_from_body(parsed.kind, reply.body)
            if answer is not None:
                self.cache.put(key, answer)
        else:
            tap = StreamTap(parsed.kind, drop_usage=drop_usage)
            reply.stream = self._tapped(reply.stream, tap, key)
        return reply

    async def _tapped(
        self, stream: AsyncIterator[bytes], tap: StreamTap, key: str
    ) -> AsyncIterator[bytes]:
        """Relay ``stream`` through ``tap``; keep the answer once the stream ended well."""
        buffer = b""
        async with aclosing(stream):  # type: ignore[type-var]
            async for chunk in stream:
                buffer += chunk
                if b"\n\n" not in buffer:
                    continue
                *events, buffer = buffer.split(b"\n\n")
                out = b"".join(e + b"\n\n" for e in events if tap.keep(e + b"\n\n"))
                if out:
                    yield out
        if buffer:
            yield buffer
        answer = tap.answer()
        if answer is not None:
            self.cache.put(key, answer)


def _marked(reply: Reply, *, hit: bool) -> Reply:
    reply.headers[HIT] = "true" if hit else "false"
    return reply


def _with_usage(parsed: ParsedRequest) -> tuple[ParsedRequest, bytes]:
    """``parsed`` asking for the usage chunk (continuous usage off, as the client had it)."""
    body = {**parsed.body, "stream_options": {"include_usage": True}}
    parsed = dataclasses.replace(parsed, body=body, include_usage=True)
    return parsed, json.dumps(body, ensure_ascii=False).encode()


def _hit(answer: Answer, parsed: ParsedRequest, request_id: str) -> Reply:
    """The reply for a hit: ``answer`` as ``parsed`` asked for it."""
    created = int(time.time())
    headers = {"x-request-id": request_id, HIT: "true"}
    if not parsed.stream:
        headers["content-type"] = "application/json"
        body = render_body(answer, model=parsed.model, request_id=request_id, created=created)
        return Reply(200, headers, body=body)
    options = parsed.body.get("stream_options") or {}
    events = render_stream(
        answer,
        model=parsed.model,
        request_id=request_id,
        created=created,
        include_usage=parsed.include_usage,
        continuous_usage=bool(options.get("continuous_usage_stats")),
    )
    headers["content-type"] = "text/event-stream; charset=utf-8"
    return Reply(200, headers, stream=_replay(b"".join(events)))


async def _replay(data: bytes) -> AsyncIterator[bytes]:
    yield data


__all__ = ["HIT", "CachedInference", "Forward", "Identities"]
