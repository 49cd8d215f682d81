"""The inference routes (fleet.coordinator.fastroutes) answer the same through the front server
and through quart on a connection handed to hypercorn: a real coordinator over loopback."""

from __future__ import annotations

import json

import trio

from fleet.coordinator.service import Coordinator, CoordinatorAddresses, CoordinatorConfig

from .test_fastserve import Client, post

CASES = [
    b"{not json",  # 400, invalid_request_error
    json.dumps({"model": "none", "prompt": "x", "max_tokens": 1}).encode(),  # 404
    json.dumps({"prompt": "x"}).encode(),  # 400, param model
]


async def _answers(client: Client, body: bytes) -> tuple[int, str, dict[str, object]]:
    await client.send(post("/v1/completions", body, "Content-Type: application/json"))
    status, headers, raw = await client.response()
    return status, headers["content-type"], json.loads(raw)


async def test_errors_are_the_same_on_the_front_server_and_on_quart() -> None:
    coord = Coordinator(
        CoordinatorConfig(port=0, agent_endpoint="tcp://127.0.0.1:*", max_body_bytes=1024)
    )
    async with trio.open_nursery() as nursery:
        addrs: CoordinatorAddresses = await nursery.start(coord.run)
        host, port = addrs.http_url.removeprefix("http://").split(":")
        front = await Client.open((host, int(port)))
        quart = await Client.open((host, int(port)))
        await quart.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")  # hands it to hypercorn
        assert (await quart.response())[0] == 200
        for body in CASES:
            via_front = await _answers(front, body)
            assert via_front == await _answers(quart, body)
            assert via_front[0] in (400, 404) and "error" in via_front[2]
        too_big = post("/v1/completions", b"x" * 2000)
        for client in (front, quart):
            await client.send(too_big)
            status, headers, raw = await client.response()
            assert (status, headers["connection"]) == (413, "close")
            assert json.loads(raw)["error"]["code"] == "payload_too_large"
        nursery.cancel_scope.cancel()
    metrics = coord.metrics.render().decode()
    assert 'fleet_requests_rejected_total{reason="payload_too_large"} 2.0' in metrics
    assert 'fleet_requests_rejected_total{reason="model_not_found"} 2.0' in metrics
