"""A fast stub engine: answers OpenAI completions at once, so a router's own CPU is what counts.

``python -m fleet.bench.stub_engine`` takes the argv the agent gives vLLM (``--model``,
``--served-model-name``, ``--host``, ``--port``; every other flag is ignored), so a real agent
can launch and register it (its launch module set to this one). h11 on trio sockets, one
process, kept-alive connections. Routes:

- ``POST /v1/completions`` and ``/v1/chat/completions``: ``max_tokens`` tokens (default 16), as
  one JSON answer, or with ``"stream": true`` as SSE events, one per token, each written on its
  own (a usage event too with ``stream_options.include_usage``), then ``data: [DONE]``;
- ``GET /health`` (200), ``GET /v1/models``, and ``GET /metrics`` with vLLM's load gauges
  (requests running now, none waiting, an empty KV cache), which the coordinator scrapes.

Anything else is 404. Nothing here models an engine's timing: that is ``fleet.agent.sim``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import h11
import trio

log = logging.getLogger(__name__)

DEFAULT_TOKENS = 16


class StubEngine:
    """The stub's state: the names it serves and the requests answering now.

    Args:
        names: the served model names (the first is the one answers name).
    """

    def __init__(self, names: Sequence[str]) -> None:
        if not names:
            raise ValueError("names: at least one served model name is needed")
        self.names = tuple(names)
        self.running = 0
        self.served = 0

    async def connection(self, stream: trio.SocketStream) -> None:
        """Serve one client connection until it closes."""
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = bytearray()
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    request, body = event, bytearray()
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage) and request is not None:
                    await self._answer(conn, stream, request, bytes(body))
                    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                        return
                    conn.start_next_cycle()
                elif event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            return

    async def _answer(
        self, conn: h11.Connection, stream: trio.SocketStream, request: h11.Request, body: bytes
    ) -> None:
        path = request.target.decode().split("?", 1)[0]
        method = request.method.decode()
        if method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            self.running += 1
            try:
                await self._complete(conn, stream, path, body)
            finally:
                self.running -= 1
                self.served += 1
        elif method == "GET" and path == "/health":
            await _send(conn, stream, 200, b"", "text/plain")
        elif method == "GET" and path == "/v1/models":
            data = [{"id": n, "object": "model", "owned_by": "fleet-stub"} for n in self.names]
            await _send(conn, stream, 200, json.dumps({"object": "list", "data": data}).encode())
        elif method == "GET" and path == "/metrics":
            await _send(conn, stream, 200, self._metrics(), "text/plain; version=0.0.4")
        else:
            error = {"error": {"message": f"no route {method} {path}", "type": "NotFound"}}
            await _send(conn, stream, 404, json.dumps(error).encode())

    def _metrics(self) -> bytes:
        label = f'{{model_name="{self.names[0]}"}}'
        return (
            f"vllm:num_requests_running{label} {self.running}\n"
            f"vllm:num_requests_waiting{label} 0\n"
            f"vllm:kv_cache_usage_perc{label} 0.0\n"
        ).encode()

    async def _complete(
        self, conn: h11.Connection, stream: trio.SocketStream, path: str, body: bytes
    ) -> None:
        try:
            req: dict[str, Any] = json.loads(body)
            tokens = int(req.get("max_tokens") or DEFAULT_TOKENS)
        except (ValueError, TypeError):
            error = {"error": {"message": "body: not a JSON completion request", "code": 400}}
            await _send(conn, stream, 400, json.dumps(error).encode())
            return
        chat = path.endswith("chat/completions")
        head = {
            "id": f"cmpl-stub-{self.served}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": req.get("model") or self.names[0],
        }
        usage = {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens}
        if not req.get("stream"):
            text = " tok" * tokens
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
            choice |= (
                {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            )
            await _send(
                conn, stream, 200, json.dumps(head | {"choices": [choice], "usage": usage}).encode()
            )
            return
        if chat:
            head["object"] = "chat.completion.chunk"
        response = h11.Response(
            status_code=200,
            headers=[("content-type", "text/event-stream"), ("cache-control", "no-cache")],
        )
        await stream.send_all(conn.send(response) or b"")
        for i in range(tokens):
            last = i == tokens - 1
            delta: dict[str, Any] = {"delta": {"content": " tok"}} if chat else {"text": " tok"}
            choice = {"index": 0, "logprobs": None, "finish_reason": "length" if last else None}
            await _event(conn, stream, head | {"choices": [choice | delta]})
        if (req.get("stream_options") or {}).get("include_usage"):
            await _event(conn, stream, head | {"choices": [], "usage": usage})
        await stream.send_all((conn.send(h11.Data(data=b"data: [DONE]\n\n")) or b"")
                              + (conn.send(h11.EndOfMessage()) or b""))  # fmt: skip


async def _event(conn: h11.Connection, stream: trio.SocketStream, obj: dict[str, Any]) -> None:
    data = b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
    await stream.send_all(conn.send(h11.Data(data=data)) or b"")


async def _send(
    conn: h11.Connection,
    stream: trio.SocketStream,
    status: int,
    body: bytes,
    content_type: str = "application/json",
) -> None:
    head = h11.Response(
        status_code=status,
        headers=[("content-type", content_type), ("content-length", str(len(body)))],
    )
    out = b"".join(conn.send(e) or b"" for e in (head, h11.Data(data=body), h11.EndOfMessage()))
    await stream.send_all(out)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse vLLM's flags (the ones the stub uses), serve until killed."""
    p = argparse.ArgumentParser(prog="python -m fleet.bench.stub_engine", description=__doc__)
    p.add_argument("--model", default="stub")
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args, ignored = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    names = args.served_model_name or [args.model]
    if ignored:
        log.info("ignored flags: %s", " ".join(ignored))
    engine = StubEngine(names)

    async def serve() -> None:
        listeners = await trio.open_tcp_listeners(args.port, host=args.host)
        port = listeners[0].socket.getsockname()[1]
        print(f"fleet-stub: serving {names[0]} at http://{args.host}:{port}", flush=True)
        await trio.serve_listeners(partial(engine.connection), listeners)

    trio.run(serve)


__all__ = ["DEFAULT_TOKENS", "StubEngine", "main"]

if __name__ == "__main__":
    main()
