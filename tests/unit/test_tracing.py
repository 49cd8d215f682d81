"""OpenTelemetry spans and JSON log lines of requests through a real coordinator (its front
server on loopback) to loopback engines that record what they receive."""

from __future__ import annotations

import functools
import io
import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer

import h11
import httpx
import pytest
import trio
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from fleet.coordinator import tracing
from fleet.coordinator.service import Coordinator, CoordinatorAddresses, CoordinatorConfig
from fleet.logjson import JsonFormatter, RequestContext
from fleet.protocol.errors import ConfigError
from fleet.protocol.messages import EngineStatus, Register

from .test_fastserve import Client, post

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{CLIENT_TRACE}-b7ad6b7169203331-01"


@dataclass
class Engine:
    """A loopback engine: answers with 500 while ``fails[0]`` (shared by the engines) is
    positive, counting it down; else OpenAI-like (SSE when asked to stream; cut after its
    first event while ``breaks[0]`` is positive). ``seen`` holds each request's headers."""

    fails: list[int]
    breaks: list[int]
    seen: list[dict[str, str]] = field(default_factory=list)

    async def serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        assert request is not None
        self.seen.append({k.decode(): v.decode() for k, v in request.headers})
        if self.fails[0] > 0:
            self.fails[0] -= 1
            status, ctype = 500, b"application/json"
            chunks = [b'{"error": {"message": "boom", "type": "InternalServerError"}}']
        elif json.loads(body).get("stream"):
            status, ctype = 200, b"text/event-stream"
            event = {"choices": [{"index": 0, "text": "hi", "finish_reason": None}]}
            chunks = [b"data: " + json.dumps(event).encode() + b"\n\n", b"data: [DONE]\n\n"]
        else:
            status, ctype = 200, b"application/json"
            chunks = [json.dumps({"choices": [{"index": 0, "text": "hi"}]}).encode()]
        head = [(b"content-type", ctype), (b"transfer-encoding", b"chunked")]
        out = conn.send(h11.Response(status_code=status, headers=head)) or b""
        cut = status == 200 and ctype == b"text/event-stream" and self.breaks[0] > 0
        if cut:
            self.breaks[0] -= 1
            chunks = chunks[:1]
        for chunk in chunks:
            out += conn.send(h11.Data(data=chunk)) or b""
        if not cut:
            out += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(out)
        await stream.aclose()


async def start_engine(nursery: trio.Nursery, engine: Engine) -> str:
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, host="127.0.0.1"), engine.serve, 0
    )
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    yield exporter
    tracing.install(None)


@pytest.fixture
async def fleet(nursery: trio.Nursery) -> AsyncIterator[tuple[str, dict[str, Engine]]]:
    """A coordinator routing model ``demo`` to engines ``e1`` and ``e2``: its URL, the engines."""
    coord = Coordinator(CoordinatorConfig(port=0, agent_endpoint="tcp://127.0.0.1:*"))
    addrs: CoordinatorAddresses = await nursery.start(coord.run)
    fails, breaks = [0], [0]
    engines = {"e1": Engine(fails, breaks), "e2": Engine(fails, breaks)}
    statuses = [
        EngineStatus(
            engine_id=e,
            model="demo",
            url=await start_engine(nursery, eng),
            state="ready",
            kind="sim",
        )  # fmt: skip
        for e, eng in engines.items()
    ]
    coord.registry.register(Register("n1", "", "test", (), tuple(statuses)), trio.current_time())
    yield addrs.http_url, engines
    nursery.cancel_scope.cancel()


async def _post(url: str, headers: dict[str, str], *, stream: bool = False) -> httpx.Response:
    body = {"model": "demo", "prompt": "hello", "max_tokens": 2, "stream": stream}
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.post(url + "/v1/completions", json=body, headers=headers)


def _tree(spans: InMemorySpanExporter) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for span in spans.get_finished_spans():
        out.setdefault(span.name, []).append(span)
    return out


def _parent(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_one_request_makes_a_span_tree_continued_by_the_engine(
    spans: InMemorySpanExporter, fleet: tuple[str, dict[str, Engine]]
) -> None:
    url, engines = fleet
    reply = await _post(url, {"traceparent": TRACEPARENT, "x-request-id": "req-1"}, stream=True)
    assert reply.status_code == 200 and reply.text.endswith("data: [DONE]\n\n")
    tree = _tree(spans)
    assert sorted(tree) == sorted(["POST /v1/completions", "fleet.admission", "fleet.schedule",
                                   "fleet.attempt", "fleet.engine_call"])  # fmt: skip
    (server,) = tree["POST /v1/completions"]
    assert server.kind is SpanKind.SERVER
    assert server.context.trace_id == int(CLIENT_TRACE, 16)  # the client's trace, continued
    assert _parent(server) == 0xB7AD6B7169203331
    assert server.attributes is not None
    assert dict(server.attributes) == {
        "http.request.method": "POST",
        "http.route": "/v1/completions",
        "fleet.request_id": "req-1",
        "gen_ai.request.model": "demo",
        "fleet.stream": True,
        "http.response.status_code": 200,
    }
    (admission,), (schedule,) = tree["fleet.admission"], tree["fleet.schedule"]
    (attempt,), (call,) = tree["fleet.attempt"], tree["fleet.engine_call"]
    for child in (admission, schedule, attempt):
        assert _parent(child) == server.context.span_id
    assert _parent(call) == attempt.context.span_id and call.kind is SpanKind.CLIENT
    assert admission.attributes is not None and admission.attributes["fleet.queued"] is False
    picked = reply.headers["x-selected-pod"]
    assert schedule.attributes is not None and schedule.attributes["fleet.engine.id"] == picked
    assert attempt.attributes is not None
    assert attempt.attributes["fleet.attempt.outcome"] == "ok"
    assert attempt.attributes["fleet.attempt.retry"] == 0
    # The engine call covers the body: it and the request end after the body was read.
    assert server.end_time is not None and call.end_time is not None
    assert attempt.end_time is not None and call.end_time >= attempt.end_time
    assert server.end_time >= call.end_time
    # The engine got the engine call's context, in the client's trace.
    (seen,) = engines[picked].seen
    assert seen["traceparent"] == f"00-{CLIENT_TRACE}-{call.context.span_id:016x}-01"


async def test_a_retried_request_shows_two_attempts(
    spans: InMemorySpanExporter, fleet: tuple[str, dict[str, Engine]]
) -> None:
    url, engines = fleet
    engines["e1"].fails[0] = 1  # whichever is tried first fails
    reply = await _post(url, {})
    assert reply.status_code == 200
    tree = _tree(spans)
    (server,) = tree["POST /v1/completions"]
    attempts = sorted(tree["fleet.attempt"], key=lambda s: s.start_time or 0)
    assert len(attempts) == 2 and len(tree["fleet.schedule"]) == 2
    outcomes = [(a.attributes or {}).get("fleet.attempt.outcome") for a in attempts]
    assert outcomes == ["5xx", "ok"]
    assert [(a.attributes or {}).get("fleet.attempt.retry") for a in attempts] == [0, 1]
    assert {_parent(a) for a in attempts} == {server.context.span_id}
    assert server.context.trace_id == attempts[0].context.trace_id  # a new trace, one of ours
    calls = tree["fleet.engine_call"]
    assert {_parent(c) for c in calls} == {a.context.span_id for a in attempts}
    sent = [h["traceparent"].split("-")[2] for e in engines.values() for h in e.seen]
    assert sorted(sent) == sorted(f"{c.context.span_id:016x}" for c in calls)


async def test_a_stream_served_by_quart_nests_the_same(
    spans: InMemorySpanExporter, fleet: tuple[str, dict[str, Engine]]
) -> None:
    url, _ = fleet
    host, port = url.removeprefix("http://").split(":")
    client = await Client.open((host, int(port)))
    await client.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # hands it to hypercorn
    assert (await client.response())[0] == 200
    body = json.dumps({"model": "demo", "prompt": "hi", "max_tokens": 2, "stream": True})
    await client.send(post("/v1/completions", body.encode(), "Content-Type: application/json"))
    status, _, raw = await client.response()
    assert status == 200 and raw.endswith(b"data: [DONE]\n\n")
    tree = _tree(spans)
    (server,), (attempt,) = tree["POST /v1/completions"], tree["fleet.attempt"]
    (call,) = tree["fleet.engine_call"]
    assert _parent(attempt) == server.context.span_id
    assert _parent(call) == attempt.context.span_id
    assert server.end_time is not None and call.end_time is not None
    assert server.end_time >= call.end_time


async def test_a_refused_request_ends_its_span_with_the_status(
    spans: InMemorySpanExporter, fleet: tuple[str, dict[str, Engine]]
) -> None:
    url, _ = fleet
    async with httpx.AsyncClient(timeout=10) as client:
        reply = await client.post(url + "/v1/completions", json={"model": "none", "prompt": "x"})
    assert reply.status_code == 404
    (server,) = spans.get_finished_spans()
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 404
    assert server.attributes["gen_ai.request.model"] == "none"


async def test_a_resumed_stream_shows_the_resume_and_its_engine_call(
    spans: InMemorySpanExporter, fleet: tuple[str, dict[str, Engine]]
) -> None:
    url, engines = fleet
    engines["e1"].breaks[0] = 1  # the first stream is cut after one event
    reply = await _post(url, {}, stream=True)
    assert reply.status_code == 200 and reply.text.endswith("data: [DONE]\n\n")
    tree = _tree(spans)
    (server,) = tree["POST /v1/completions"]
    (attempt,), (resume,) = tree["fleet.attempt"], tree["fleet.resume"]
    assert _parent(resume) == _parent(attempt) == server.context.span_id
    first = reply.headers["x-selected-pod"]
    other = ({"e1", "e2"} - {first}).pop()
    assert resume.attributes is not None
    assert dict(resume.attributes) == {"fleet.engine.id": first, "fleet.resume.outcome": other}
    calls = {_parent(c): c for c in tree["fleet.engine_call"]}
    assert set(calls) == {attempt.context.span_id, resume.context.span_id}
    (seen,) = engines[other].seen
    assert (
        seen["traceparent"].split("-")[2] == f"{calls[resume.context.span_id].context.span_id:016x}"
    )
    assert server.end_time is not None and resume.end_time is not None
    assert server.end_time >= resume.end_time


async def test_a_log_line_carries_the_request_id_and_trace_id(
    spans: InMemorySpanExporter, fleet: tuple[str, dict[str, Engine]]
) -> None:
    url, _ = fleet
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestContext())
    logger = logging.getLogger("fleet")
    logger.addHandler(handler)
    try:
        assert (await _post(url, {"x-request-id": "req-7"})).status_code == 200
    finally:
        logger.removeHandler(handler)
    (server,) = _tree(spans)["POST /v1/completions"]
    # The coordinator has no tokenizer for `demo`: it says so while routing the request.
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    (line,) = [line for line in lines if "no model folder known" in line["message"]]
    assert line["level"] == "WARNING" and line["logger"] == "fleet.coordinator.router.prompt"
    assert line["request_id"] == "req-7"
    assert line["trace_id"] == f"{server.context.trace_id:032x}"
    assert set(line) == {"time", "level", "logger", "message", "request_id", "trace_id", "span_id"}
    assert all(line.get("request_id") == "req-7" for line in lines)


async def test_a_trace_the_client_did_not_sample_is_passed_on_unsampled(
    spans: InMemorySpanExporter, fleet: tuple[str, dict[str, Engine]]
) -> None:
    url, engines = fleet
    unsampled = TRACEPARENT.removesuffix("-01") + "-00"
    assert (await _post(url, {"traceparent": unsampled})).status_code == 200
    assert spans.get_finished_spans() == ()  # the SDK's default sampler follows the parent
    (seen,) = [h for e in engines.values() for h in e.seen]
    version, trace_id, span_id, flags = seen["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", CLIENT_TRACE, "00")
    assert span_id != TRACEPARENT.split("-")[2]  # the engine call's own id


async def test_tracing_off_adds_nothing_and_passes_the_clients_traceparent(
    fleet: tuple[str, dict[str, Engine]],
) -> None:
    url, engines = fleet
    assert not tracing.enabled()
    assert (await _post(url, {"traceparent": TRACEPARENT})).status_code == 200
    (seen,) = [h for e in engines.values() for h in e.seen]
    assert seen["traceparent"] == TRACEPARENT


def test_a_bad_endpoint_is_rejected() -> None:
    with pytest.raises(ConfigError, match="--otel-endpoint"):
        tracing.configure("collector:4318")


def test_an_endpoint_sends_the_spans_over_otlp_http(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")  # the `tracing` extra
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        monkeypatch.delenv(name, raising=False)
    received: list[tuple[str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            size = int(self.headers["content-length"])
            received.append((self.path, self.rfile.read(size)))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        provider = tracing.configure(f"http://127.0.0.1:{server.server_port}")
        assert tracing.enabled()
        with tracing.span("fleet.smoke", {"fleet.request_id": "req-9"}):
            pass
        tracing.install(None)
        provider.shutdown()  # flushes the batch
    finally:
        server.shutdown()
        thread.join()
    ((path, body),) = received
    assert path == "/v1/traces" and b"fleet.smoke" in body and b"req-9" in body
    assert tracing.configure(None) is None and not tracing.enabled()
