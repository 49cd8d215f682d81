"""``malformed-http``: bad requests of every kind, sent beside a good load that must not notice.

Each case is exact bytes on its own connection (:mod:`.rawhttp`). Its answer must be a 4xx with
OpenAI's JSON error body, or no answer at all (the connection dropped); a few cases whose request
is valid in the end (a body dribbled slowly, then completed) may also be served (2xx JSON).
Cases that are not HTTP at all (broken framing: garbage request line, bad chunking, oversized
headers, a body cut short) never reach Fleet's handlers: the HTTP server (hypercorn/h11) answers
them with its own bare 4xx and closes, which is accepted for them (``framing``) and counted
apart (``framing_bare_4xx``).
Two kinds of client misbehave over time: ``slow_clients`` dribble a valid body a few bytes at a
time (half complete it, half vanish mid-body), and ``vanishing_streams`` read the first event of
a long stream and close the connection; afterwards nothing may be left in flight in the
coordinator (``fleet_requests_inflight``) or in the engines (``/load``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from .load import background, run_clock
from .outcomes import figures
from .rawhttp import Answer, Reader, address, exchange, json_request, request_bytes
from .scenarios import ChaosConfig, Figures, load_spec
from .target import Target, total

SLOW_CLIENTS = 8
VANISHING_STREAMS = 8
DRIBBLE_BYTES = 16
DRIBBLE_EVERY_S = 0.05
BIG_BODY_BYTES = 8 * 1024 * 1024  # above the default 4 MiB limit
DRAIN_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Case:
    """One malformed request.

    Attributes:
        name: what it is.
        data: the bytes sent (``{host}`` is not substituted: built per target).
        may_succeed: a 2xx answer is acceptable too (the request is valid in the end).
        framing: not parseable as HTTP: the HTTP server's bare 4xx is acceptable too.
    """

    name: str
    data: bytes
    may_succeed: bool = False
    framing: bool = False


def cases(host: str, model: str, auth: dict[str, str] | None = None) -> list[Case]:
    """The one-shot cases against ``host`` for ``model`` (``auth``: headers every well-framed
    request carries, so that it reaches validation on a fleet with API keys)."""
    ok: dict[str, Any] = {"model": model, "prompt": "hello", "max_tokens": 2}
    post = "/v1/completions"
    auth = auth or {}

    def raw(name: str, body: bytes, headers: dict[str, str] | None = None) -> Case:
        return Case(name, request_bytes("POST", post, host, body, {**auth, **(headers or {})}))

    def js(name: str, body: Any, headers: dict[str, str] | None = None) -> Case:
        return Case(name, json_request(post, host, body, {**auth, **(headers or {})}))

    big = b'{"model": "' + model.encode() + b'", "prompt": "' + b"a" * BIG_BODY_BYTES + b'"}'
    deep = b"[" * 100_000 + b"]" * 100_000
    huge = "9" * 5000
    return [
        raw("invalid JSON", b'{"model": "' + model.encode() + b'", "prompt": '),
        raw("not UTF-8", b'{"model": "\xff\xfe", "prompt": "x"}'),
        js("JSON not an object", [1, 2, 3]),
        js("no model", {"prompt": "x"}),
        js("model not a string", {"model": 7, "prompt": "x"}),
        js("unknown model", {**ok, "model": "no-such-model"}),
        js("prompt of wrong type", {**ok, "prompt": 5}),
        js("max_tokens a string", {**ok, "max_tokens": "x"}),
        js("max_tokens negative", {**ok, "max_tokens": -1}),
        js("max_tokens huge", {**ok, "max_tokens": 10**12}),
        raw("NaN", json.dumps({**ok, "temperature": float("nan")}).encode()),
        raw("integer of 5000 digits", f'{{"model": "{model}", "max_tokens": {huge}}}'.encode()),
        raw("nesting 100k deep", deep),
        js("messages not a list", {"model": model, "messages": "hi"}),
        js("message without role", {"model": model, "messages": [{"content": "x"}]}),
        js("stream not a bool", {**ok, "stream": "yes"}),
        Case("body over the limit", request_bytes("POST", post, host, big)),
        Case(
            "content-length over the limit, little sent",
            request_bytes("POST", post, host, b"{}", {"content-length": str(64 * 1024 * 1024)}),
        ),
        js("x-priority bogus", ok, {"x-priority": "bogus"}),
        js("x-request-timeout -1", ok, {"x-request-timeout": "-1"}),
        js("x-request-timeout nan", ok, {"x-request-timeout": "nan"}),
        js("x-request-timeout text", ok, {"x-request-timeout": "soon"}),
        Case(
            "header of 256 KiB",
            request_bytes("POST", post, host, json.dumps(ok).encode(), {"x-junk": "j" * 262144}),
            framing=True,
        ),
        Case("request line garbage", b"HELLO THERE\r\n\r\n", framing=True),
        Case("binary garbage", bytes(range(256)) * 16, framing=True),
        Case(
            "content-length not a number",
            request_bytes("POST", post, host, b"{}", {"content-length": "ten"}),
            framing=True,
        ),
        Case(
            "bad chunked framing",
            request_bytes("POST", post, host, b"zz\r\nxx\r\n", {"transfer-encoding": "chunked"}),
            framing=True,
        ),
        Case("GET on an inference route", request_bytes("GET", post, host)),
        Case("unknown route", request_bytes("POST", "/v1/nothing-here", host, b"{}")),
        Case(
            "body shorter than content-length, then EOF",
            request_bytes("POST", post, host, b'{"model"', {"content-length": "1000"}),
            framing=True,
        ),
    ]


def acceptable(answer: Answer, *, may_succeed: bool = False, framing: bool = False) -> bool:
    """A 4xx JSON error, a dropped connection, (``may_succeed``) a 2xx, or (``framing``) any
    4xx."""
    if answer.dropped:
        return True
    assert answer.status is not None
    if 400 <= answer.status < 500 and (answer.json_error() or framing):
        return True
    return may_succeed and 200 <= answer.status < 300 and not answer.error


def describe(answer: Answer) -> str:
    if answer.dropped:
        return f"dropped ({answer.error})"
    return f"{answer.status} {answer.body[:100]!r}" + (f" [{answer.error}]" if answer.error else "")


async def _one_shot(host: str, port: int, case: Case, timeout_s: float) -> Answer:
    if case.name.endswith("then EOF"):
        return await _half_close(host, port, case.data, timeout_s)
    return await exchange(host, port, case.data, timeout_s)


async def _half_close(host: str, port: int, data: bytes, timeout_s: float) -> Answer:
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        with trio.move_on_after(timeout_s):
            await stream.send_all(data)
            await stream.send_eof()
            return await Reader(stream).answer()
    return Answer(None, error="timeout")


async def _slow_client(
    host: str, port: int, model: str, complete: bool, timeout_s: float, auth: dict[str, str]
) -> Answer:
    """Dribble a valid request; complete it, or vanish halfway through the body."""
    body = json.dumps({"model": model, "prompt": "slow " * 20, "max_tokens": 2}).encode()
    data = request_bytes("POST", "/v1/completions", host, body, auth)
    cut = len(data) if complete else len(data) - len(body) // 2
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        with trio.move_on_after(timeout_s):
            for start in range(0, cut, DRIBBLE_BYTES):
                await stream.send_all(data[start : min(start + DRIBBLE_BYTES, cut)])
                await trio.sleep(DRIBBLE_EVERY_S)
            if not complete:
                return Answer(None, error="client vanished mid-body")
            return await Reader(stream).answer()
    return Answer(None, error="timeout")


async def _vanishing_stream(
    host: str, port: int, model: str, timeout_s: float, auth: dict[str, str]
) -> Answer:
    """Start a long stream, read its first bytes, close the connection."""
    body = {"model": model, "prompt": "tell me everything", "max_tokens": 500, "stream": True}
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        with trio.move_on_after(timeout_s):
            await stream.send_all(json_request("/v1/completions", host, body, auth))
            first = await stream.receive_some(4096)
            return Answer(None, body=first, error="client closed after the first bytes")
    return Answer(None, error="timeout")


async def malformed_http(target: Target, cfg: ChaosConfig) -> Figures:
    """Run every case, the slow clients and the vanishing streams beside a good load."""
    host, port = address(target.url)
    clock = run_clock()
    results: dict[str, str] = {}
    bad: dict[str, str] = {}
    framing_bare = [0]
    spec = load_spec(target, cfg, "malformed-http")
    timeout_s = cfg.client_timeout_s
    auth = {"authorization": f"Bearer {target.api_key}"} if target.api_key else {}

    def note(name: str, answer: Answer, ok: bool) -> None:
        results[name] = describe(answer)
        if not ok:
            bad[name] = results[name]

    async with background(target.url, spec, clock) as load:
        await trio.sleep(cfg.warmup_s)
        async with trio.open_nursery() as nursery:

            async def run_case(case: Case) -> None:
                answer = await _one_shot(host, port, case, timeout_s)
                ok = acceptable(answer, may_succeed=case.may_succeed, framing=case.framing)
                note(case.name, answer, ok)
                if case.framing and not answer.dropped and not answer.json_error():
                    framing_bare[0] += 1

            async def run_slow(i: int) -> None:
                complete = i % 2 == 0
                answer = await _slow_client(host, port, target.model, complete, timeout_s, auth)
                name = f"slow client {i} ({'completes' if complete else 'vanishes'})"
                note(name, answer, acceptable(answer, may_succeed=complete))

            async def run_vanishing(i: int) -> None:
                answer = await _vanishing_stream(host, port, target.model, timeout_s, auth)
                note(f"stream abandoned {i}", answer, answer.error.startswith("client closed"))

            for case in cases(host, target.model, auth):
                nursery.start_soon(run_case, case)
            for i in range(SLOW_CLIENTS):
                nursery.start_soon(run_slow, i)
            for i in range(VANISHING_STREAMS):
                nursery.start_soon(run_vanishing, i)
        await trio.sleep(cfg.tail_s)
    drained_s = await _drained(target, clock)
    return {
        **figures(load.records),
        "detect_s": None,
        "recover_s": None,
        "cases": len(results),
        "cases_unacceptable": len(bad),
        "framing_bare_4xx": framing_bare[0],
        "drained_s": drained_s,
        "answers": results,
        "unacceptable": bad,
        "checks": {
            "every malformed request: 4xx JSON error or dropped": not bad,
            "nothing left in flight after the clients left": drained_s is not None,
        },
    }


async def _drained(target: Target, clock: Callable[[], float]) -> float | None:
    """Seconds until nothing is in flight in the coordinator and engines; None on timeout."""
    start = clock()
    engines = await target.engines()
    with trio.move_on_after(DRAIN_TIMEOUT_S):
        while True:
            metrics = await target.metrics()
            inflight = total(metrics, "fleet_requests_inflight")
            loads = 0
            for engine in engines:
                r = await target.http.get(engine["url"] + "/load", timeout=10)
                loads += int(r.json().get("server_load", 0)) if r.status_code == 200 else 0
            if inflight == 0 and loads == 0:
                return round(clock() - start, 3)
            await trio.sleep(0.2)
    return None


__all__ = ["Case", "acceptable", "cases", "malformed_http"]
