"""The chaos suite's own logic: judging answers, figures, targets, the request mix, the bare
HTTP reader, reports, and the watcher's timing (virtual time, real HTTP seam)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from fleet.chaos import report
from fleet.chaos.cli import config
from fleet.chaos.load import LoadSpec, plan
from fleet.chaos.outcomes import (
    EngineSample,
    Outcome,
    Record,
    figures,
    first_time,
    judge,
    since,
    sse_data,
)
from fleet.chaos.rawhttp import Answer, Reader, request_bytes
from fleet.chaos.scenarios import ChaosConfig, missed, scenarios
from fleet.chaos.target import Target, Watcher, deltas
from fleet.protocol.errors import ConfigError

SSE = {"content-type": "text/event-stream; charset=utf-8"}
JSON = {"content-type": "application/json"}
CHUNK = b'data: {"choices": [{"text": "a"}]}\n\n'
DONE = b"data: [DONE]\n\n"


def test_complete_answers_succeed() -> None:
    assert judge(200, JSON, b'{"choices": []}').outcome is Outcome.SUCCEEDED
    assert judge(200, SSE, CHUNK + CHUNK + DONE).outcome is Outcome.SUCCEEDED


@pytest.mark.parametrize(
    ("status", "headers", "body", "error", "outcome"),
    [
        (None, {}, b"", "ConnectError: refused", Outcome.LOST),
        (400, JSON, b'{"error": {"message": "bad", "type": "x"}}', "", Outcome.FAILED),
        (503, JSON, b'{"error": {"message": "full", "type": "x"}}', "", Outcome.FAILED),
        (500, {"content-type": "text/html"}, b"<h1>oops</h1>", "", Outcome.BROKEN),
        (200, JSON, b'{"choices": [', "", Outcome.BROKEN),
        (200, JSON, b'{"choices": []}', "RemoteProtocolError: cut", Outcome.BROKEN),
        (200, JSON, b'{"id": "no choices"}', "", Outcome.BROKEN),
        (302, {}, b"", "", Outcome.BROKEN),
        (200, SSE, CHUNK + CHUNK, "", Outcome.BROKEN),  # no [DONE]
        (200, SSE, CHUNK + DONE, "ReadError: reset", Outcome.BROKEN),
        (200, SSE, CHUNK + b"data: {not json\n\n" + DONE, "", Outcome.BROKEN),
        (200, SSE, CHUNK + b"data: [1, 2]\n\n" + DONE, "", Outcome.BROKEN),
        (200, SSE, CHUNK + DONE + CHUNK, "", Outcome.BROKEN),
        (200, SSE, DONE, "", Outcome.BROKEN),  # no chunk at all
        (200, SSE, CHUNK + b'data: {"error": {"message": "x"}}\n\n' + DONE, "", Outcome.FAILED),
    ],
)
def test_each_kind_of_answer_is_judged(
    status: int | None, headers: dict[str, str], body: bytes, error: str, outcome: Outcome
) -> None:
    verdict = judge(status, headers, body, transport_error=error)
    assert verdict.outcome is outcome
    assert verdict.detail


def test_sse_events_are_split_like_a_browser_does() -> None:
    body = b": comment\r\n\r\ndata: a\r\ndata: b\r\n\r\nevent: x\ndata:c\n\ndata: partial"
    assert sse_data(body) == ["a\nb", "c"]


def _record(outcome: Outcome, latency: float, status: int | None = 200, **kw: Any) -> Record:
    return Record("completion", False, 1.0, 1.0 + latency, status, outcome, **kw)


def test_figures_count_outcomes_and_take_latencies_of_successes() -> None:
    records = [_record(Outcome.SUCCEEDED, t / 1000) for t in range(1, 101)]
    records += [
        _record(Outcome.FAILED, 9.0, 503, detail="503 full"),
        _record(Outcome.FAILED, 9.0, 503, detail="503 full", no_retry_after=True),
        _record(Outcome.LOST, 30.0, None, detail="timeout"),
    ]
    fig = figures(records)
    assert (fig["sent"], fig["succeeded"], fig["failed"], fig["lost"]) == (103, 100, 2, 1)
    assert fig["broken"] == 0
    assert fig["rejected_503"] == 2 and fig["rejected_503_no_retry_after"] == 1
    assert fig["p50_ms"] == 50.5 and fig["p99_ms"] == 99.0
    assert fig["examples"] == {"failed": ["503 full"], "lost": ["timeout"]}
    empty = figures([])
    assert empty["sent"] == 0 and empty["p50_ms"] is None


def test_an_engine_is_routed_only_ready_and_with_its_breaker_not_open() -> None:
    assert EngineSample(0.0, "ready", 1, 0).routed
    assert EngineSample(0.0, "ready", 1, 1).routed  # half-open lets a probe through
    assert not EngineSample(0.0, "ready", 1, 2).routed
    assert not EngineSample(0.0, "backoff", 0, 0).routed
    samples = [EngineSample(t / 10, "ready" if t < 7 else "unhealthy") for t in range(10)]
    assert first_time(samples, lambda s: not s.routed) == 0.7
    assert first_time(samples, lambda s: s.t > 0.5 and s.routed) == 0.6
    assert first_time(samples, lambda s: s.state == "absent") is None
    assert since(2.5, 1.0) == 1.5 and since(None, 1.0) is None


def test_targets() -> None:
    clean = {"sent": 10, "succeeded": 10, "failed": 0, "lost": 0, "broken": 0}
    assert missed(clean) == []
    assert missed({**clean, "failed": 1}) == ["failed == 0 (failed 1)"]
    assert len(missed({**clean, "lost": 1, "broken": 2})) == 2
    assert missed({**clean, "checks": {"index matches": False, "other": True}}) == ["index matches"]
    overload = {**clean, "failed": 5, "rejected_503": 5, "goodput_ratio": 0.95}
    assert missed(overload, overload=True) == []
    assert len(missed({**overload, "rejected_503": 4}, overload=True)) == 1  # a 504 among them
    assert len(missed({**overload, "rejected_503_no_retry_after": 1}, overload=True)) == 1
    assert len(missed({**overload, "goodput_ratio": 0.89}, overload=True)) == 1
    assert len(missed({**overload, "goodput_ratio": None}, overload=True)) == 1


def test_every_scenario_is_registered_once_and_only_overload_expects_failures() -> None:
    known = scenarios()
    assert list(known) == [
        "engine-sigkill",
        "engine-hang",
        "agent-kill",
        "coordinator-kill",
        "kv-events",
        "overload",
        "scale-down",
        "malformed-http",
        "malformed-wire",
        "rogue-agent",
        "response-cache-redis-down",
    ]
    assert [n for n, s in known.items() if s.overload] == ["overload"]
    assert {n: s.cache for n, s in known.items() if s.cache} == {
        "response-cache-redis-down": "redis"
    }
    assert {n: s.link for n, s in known.items() if s.link} == {
        "malformed-wire": "plaintext",
        "rogue-agent": "curve",
    }
    assert [n for n, s in known.items() if s.nodes > 1] == ["agent-kill"]
    assert [n for n, s in known.items() if s.coordinators > 1] == ["coordinator-kill"]


def test_the_request_mix_is_seeded_shares_prefixes_and_carries_the_deadline() -> None:
    spec = LoadSpec(model="demo", prefixes=2, seed=3)
    requests = [plan(spec, i) for i in range(200)]
    assert requests == [plan(spec, i) for i in range(200)]
    assert requests != [plan(LoadSpec(model="demo", prefixes=2, seed=4), i) for i in range(200)]
    assert 60 < sum(r.stream for r in requests) < 140
    assert {r.kind for r in requests} == {"chat", "completion"}
    assert all(r.headers["x-request-timeout"] == "5" for r in requests)
    texts = [r.body.get("prompt") or r.body["messages"][0]["content"] for r in requests]
    assert len({t.split(".")[0] for t in texts}) == 2  # two shared prefixes
    assert not any(plan(LoadSpec(model="m", stream_share=0.0), i).stream for i in range(50))
    assert "x-request-timeout" not in plan(LoadSpec(model="m", deadline_s=None), 0).headers


@pytest.mark.parametrize(
    "bad",
    [
        {"concurrency": 0},
        {"stream_share": 1.5},
        {"deadline_s": -1.0},
        {"deadline_s": float("inf")},
        {"prefixes": 0},
    ],
)
def test_load_spec_rejects_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as err:
        LoadSpec(model="demo", **bad)
    assert err.value.key == next(iter(bad))


def test_chaos_config_from_key_value_settings() -> None:
    cfg = config(["burst_new_connections=true", "concurrency=4", "burst-s=0.5"])
    assert cfg.burst_new_connections is True and cfg.concurrency == 4 and cfg.burst_s == 0.5
    assert config([]) == ChaosConfig()
    for bad in (["nope=1"], ["concurrency"], ["concurrency=x"], ["burst_new_connections=2"]):
        with pytest.raises(ConfigError):
            config(bad)
    with pytest.raises(ConfigError):
        config(["concurrency=0"])


def test_counter_deltas_name_each_sample_that_grew() -> None:
    before = [("c_total", {"engine": "a"}, 1.0), ("c_total", {"engine": "b"}, 2.0)]
    after = [
        ("c_total", {"engine": "a"}, 4.0),
        ("c_total", {"engine": "b"}, 2.0),
        ("c_total", {"engine": "c"}, 1.0),
        ("other_total", {}, 9.0),
    ]
    assert deltas(before, after, ("c_total",)) == {
        "c_total{engine=a}": 3.0,
        "c_total{engine=c}": 1.0,
    }


async def _serve_bytes(chunks: list[bytes]) -> Any:
    """The answer a Reader gets when the server sends ``chunks`` then closes."""
    client, server = trio.testing.memory_stream_pair()

    async def serve() -> None:
        for chunk in chunks:
            await server.send_all(chunk)
        await server.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        return await Reader(client).answer()


async def test_the_bare_reader_parses_lengths_chunks_and_early_closes() -> None:
    plain = await _serve_bytes(
        [b"HTTP/1.1 400 Bad\r\ncontent-length: 12\r\nRetry-After: 2\r\n\r\n", b'{"error": {}}'[:12]]
    )
    assert plain.status == 400 and plain.headers["retry-after"] == "2" and not plain.error
    chunked = await _serve_bytes(
        [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n", b"3\r\nabc\r\n0\r\n\r\n"]
    )
    assert (chunked.status, chunked.body, chunked.error) == (200, b"abc", "")
    cut = await _serve_bytes([b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"])
    assert cut.status == 200 and cut.body == b"abc" and cut.error
    dropped = await _serve_bytes([])
    assert dropped.dropped and dropped.error == "closed"
    garbage = await _serve_bytes([b"SSH-2.0-OpenSSH\r\n\r\n"])
    assert garbage.status is None and "bad framing" in garbage.error
    assert Answer(400, {}, b'{"error": {"message": "x"}}').json_error()
    assert not Answer(400, {}, b"<html>").json_error()


def test_requests_are_exact_bytes() -> None:
    data = request_bytes("POST", "/v1/x", "h", b"{}", {"x-priority": "high"})
    head, body = data.split(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/x HTTP/1.1" and body == b"{}"
    assert {b"host: h", b"content-length: 2", b"x-priority: high", b"connection: close"} <= set(
        lines
    )


def test_reports_are_json_per_scenario_a_summary_and_a_table(tmp_path: Path) -> None:
    results = [
        {
            "scenario": "engine-hang",
            "sent": 5,
            "succeeded": 4,
            "failed": 1,
            "lost": 0,
            "broken": 0,
            "p50_ms": 90.0,
            "p99_ms": 120.5,
            "detect_s": 6.9,
            "recover_s": None,
            "stopped_s": 7.0,
            "failed_by_status": {"504": 1},
            "missed": ["failed == 0 (failed 1)"],
        }
    ]
    folder = report.write(results, tmp_path / "out")
    assert json.loads((folder / "engine-hang.json").read_text())["sent"] == 5
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["results"] == results and "machine" in summary
    table = (folder / "summary.md").read_text().splitlines()
    assert table[0].startswith("| scenario | sent |") and len(table) == 3
    assert "| engine-hang | 5 | 4 | 1 | 0 | 0 | 90 | 120.5 | 6.9 | — |" in table[2]
    assert "stopped_s=7; failed_by_status=504: 1" in table[2]
    assert "MISSED: failed == 0 (failed 1)" in table[2]


async def test_the_watcher_times_when_an_engine_leaves_and_rejoins_routing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Through the coordinator's real API shapes (an httpx transport is the seam): the engine
    is ready, goes to backoff at t = 1 s, is ready again at t = 3 s with its breaker open, and
    its breaker closes at t = 4 s."""

    def engines(request: httpx.Request) -> httpx.Response:
        now = trio.current_time()
        if request.url.path == "/metrics":
            breaker = 2 if 3.0 <= now < 4.0 else 0
            return httpx.Response(200, text=f'fleet_breaker_state{{engine="e1"}} {breaker}\n')
        state = "backoff" if 1.0 <= now < 3.0 else "ready"
        engine = {"id": "e1", "model": "m", "state": state, "pid": 7 if state == "ready" else 0}
        return httpx.Response(200, json={"engines": [engine]})

    async with httpx.AsyncClient(transport=httpx.MockTransport(engines)) as http:
        target = Target(url="http://coord", http=http, model="m", agent_endpoint="")
        start = trio.current_time()
        watcher = Watcher(target, "e1", lambda: trio.current_time() - start, interval_s=0.1)
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run)
            left = await watcher.when(lambda s: not s.routed, timeout_s=10)
            back = await watcher.when(lambda s: s.t > 2 and s.routed, timeout_s=10)
            never = await watcher.when(lambda s: s.state == "absent", timeout_s=2)
            nursery.cancel_scope.cancel()
    assert left == pytest.approx(1.0, abs=0.11)
    assert back == pytest.approx(4.0, abs=0.11)
    assert never is None
    assert {s.pid for s in watcher.samples} == {0, 7}


async def test_the_fault_proxy_passes_delays_partitions_and_heals(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from fleet.chaos.tcpproxy import FaultProxy

    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while data := await stream.receive_some(1024):
                    await stream.send_all(data)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, echo, 0)
        proxy = FaultProxy("127.0.0.1", listeners[0].socket.getsockname()[1])
        port = await nursery.start(proxy.run)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"ping")
        assert await stream.receive_some(1024) == b"ping"
        proxy.delay(2.0)
        sent = trio.current_time()
        await stream.send_all(b"slow")
        assert await stream.receive_some(1024) == b"slow"
        assert trio.current_time() - sent >= 4.0  # held on the way there and back
        proxy.partition()
        assert await stream.receive_some(1024) == b""  # cut
        assert proxy.cut == 1
        refused = await trio.open_tcp_stream("127.0.0.1", port)
        assert await refused.receive_some(1024) == b""  # accepted, closed at once
        proxy.heal()
        again = await trio.open_tcp_stream("127.0.0.1", port)
        await again.send_all(b"back")
        assert await again.receive_some(1024) == b"back"
        with pytest.raises(ValueError):
            proxy.delay(-1)
        nursery.cancel_scope.cancel()
