"""Draining the HTTP server (fleet.coordinator.httpserve) and restarting the coordinator without
refusing a connection (fleet.coordinator.hotrestart), over real sockets and real processes."""

from __future__ import annotations

import signal
import sys
from typing import Any

import httpx
import pytest
import trio
from hypercorn.config import Config as HypercornConfig

from fleet.coordinator.hotrestart import READY, HotRestart, listen, restart_wait_s
from fleet.coordinator.httpserve import serve

# -- the drain ----------------------------------------------------------------------------------


class App:
    """An ASGI app: ``/slow`` answers once ``release`` is set, anything else at once."""

    def __init__(self) -> None:
        self.release = trio.Event()
        self.slow_started = trio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["path"] == "/slow":
            self.slow_started.set()
            await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": scope["path"].encode()})


async def test_a_drain_finishes_requests_in_flight_then_closes_connections(
    nursery: trio.Nursery,
) -> None:
    app = App()
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    drain, served = trio.Event(), trio.Event()

    async def run(*, task_status: trio.TaskStatus[list[str]]) -> None:
        await serve(app, config, drain=drain, drain_s=10, task_status=task_status)
        served.set()

    url = (await nursery.start(run))[0]
    responses: list[httpx.Response] = []
    answered = trio.Event()
    idle = httpx.AsyncClient(base_url=url)  # keeps an idle keep-alive connection open
    before = await idle.get("/fast")
    assert before.status_code == 200 and "connection" not in before.headers  # keep-alive
    async with httpx.AsyncClient(base_url=url) as client:

        async def slow() -> None:
            responses.append(await client.get("/slow"))
            answered.set()

        nursery.start_soon(slow)
        await app.slow_started.wait()
        drain.set()
        # The server stops accepting in a few steps of this process, no I/O involved: done
        # once every task here waits (a real-time sleep raced those steps on a busy machine).
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(httpx.ConnectError):  # no longer accepting (no parent holds it)
            await httpx.AsyncClient().get(url + "/fast")
        assert not served.is_set()  # a request is in flight: the server waits for it
        app.release.set()
        with trio.fail_after(10):  # a safety bound: the answer takes milliseconds
            await answered.wait()
        [answer] = responses
        assert answer.status_code == 200 and answer.text == "/slow"
        # Its connection stays for the next request, which is told to close it.
        after = await client.get("/fast")
        assert after.status_code == 200 and after.headers["connection"] == "close"
    # The idle connection is not closed under a request its client may be sending: it is
    # still served (and told to close), and the server stops once its client let it go.
    assert not served.is_set()
    again = await idle.get("/fast")
    assert again.status_code == 200 and again.headers["connection"] == "close"
    with trio.fail_after(5):
        await served.wait()
    await idle.aclose()


# -- the hot-restart parent ---------------------------------------------------------------------

CHILD = f"""
import os, signal, socket, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
listener = socket.socket(fileno=int(sys.argv[1]))
socket.socket(fileno=int(sys.argv[2])).send({READY!r})
while True:
    conn, _ = listener.accept()
    conn.recv(65536)
    body = str(os.getpid()).encode()
    conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n%s"
                 % (len(body), body))
    conn.close()
"""


def child_argv(http_fd: int, parent_fd: int) -> list[str]:
    return [sys.executable, "-c", CHILD, str(http_fd), str(parent_fd)]


async def _pid(url: str) -> int:
    async with httpx.AsyncClient() as client:
        return int((await client.get(url, timeout=10)).text)


async def test_the_socket_outlives_crashes_and_restarts(nursery: trio.Nursery) -> None:
    sock = listen("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    keeper = HotRestart(child_argv, sock)
    status: list[int] = []
    ended = trio.Event()

    async def run(*, task_status: trio.TaskStatus[None]) -> None:
        status.append(await keeper.run(task_status=task_status))
        ended.set()

    await nursery.start(run)
    assert keeper.current is not None
    with trio.fail_after(10):
        await keeper.current.ready.wait()
    first = keeper.current.proc.pid
    assert await _pid(url) == first

    keeper.current.proc.send_signal(signal.SIGKILL)  # a crash: the next request waits, served
    with trio.fail_after(10):
        second = await _pid(url)
    assert second != first and keeper.restarts == 1

    assert keeper.current is not None
    old = keeper.current
    keeper.restart()  # what SIGHUP does: the old child is told to stop, a new one starts
    with trio.fail_after(10):
        assert await old.proc.wait() == 0
        third = await _pid(url)
    assert third not in (first, second) and keeper.restarts == 1  # not counted as a crash

    keeper.stop()
    with trio.fail_after(10):
        await ended.wait()
    assert status == [0] and not keeper.children
    sock.close()


async def test_a_child_that_never_serves_ends_the_parent_with_its_status() -> None:
    sock = listen("127.0.0.1", 0)
    keeper = HotRestart(lambda http_fd, parent_fd: [sys.executable, "-c", "exit(3)"], sock)
    with trio.fail_after(10):
        assert await keeper.run() == 3
    assert keeper.generation == 1  # not started again
    sock.close()


def test_a_crash_looping_child_waits_longer_each_time() -> None:
    assert [restart_wait_s(n, 30.0) for n in range(1, 9)] == [0, 0.5, 1, 2, 4, 8, 16, 30]
    assert restart_wait_s(50, 30.0) == 30.0
