"""Fleet's HTTP servers speak HTTP/1.1 only, as vLLM's uvicorn does (fleet.protocol.http11):
an HTTP/2 preface or an ``Upgrade: h2c`` request never switches a connection to hypercorn's
HTTP/2 path, which can raise out of the connection and end the whole server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import trio
from hypercorn.config import Config

from fleet.coordinator.httpserve import serve

from .simgateway import start_sim

# the client connection preface, then an empty SETTINGS frame (RFC 9113, section 3.4)
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
H2C_UPGRADE = (
    b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
)


async def _exchange(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(data)
        got = b""
        with trio.move_on_after(5):
            while b"\r\n\r\n" not in got:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                got += chunk
        return got


async def _check_http11_only(url: str, path: str) -> None:
    upgraded = await _exchange(url, H2C_UPGRADE.replace(b"/health", path.encode()))
    assert upgraded.startswith(b"HTTP/1.1 200"), upgraded[:80]  # served, not 101
    assert b"h2c" not in upgraded.split(b"\r\n\r\n")[0].lower()
    refused = await _exchange(url, H2_PREFACE)
    assert refused.startswith(b"HTTP/1.1 "), refused[:80]  # an HTTP/1.1 answer, not SETTINGS
    async with httpx.AsyncClient() as client:  # and the server still serves
        assert (await client.get(url + path)).status_code == 200


async def test_a_simulated_engine_never_switches_to_http2(
    demo_model: Path, nursery: trio.Nursery
) -> None:
    url = await start_sim(demo_model, nursery)
    await _check_http11_only(url, "/health")
    nursery.cancel_scope.cancel()


async def test_the_coordinators_server_never_switches_to_http2(nursery: trio.Nursery) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    config = Config()
    config.bind = ["127.0.0.1:0"]
    binds = await nursery.start(lambda task_status: serve(
        app, config, drain=trio.Event(), drain_s=1.0, task_status=task_status
    ))  # fmt: skip
    await _check_http11_only(binds[0], "/healthz")
    nursery.cancel_scope.cancel()
