"""A real ``redis-server`` on loopback for tests: started on a free port, stopped by its PID.

Debian's ``redis-server`` (``make install`` puts it there when missing). Nothing is persisted
(``--save "" --appendonly no``); its output goes to ``redis-PORT.log`` in the given folder.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

READY = "Ready to accept connections"
START_TIMEOUT_S = 30.0  # it starts in ~10 ms; a loaded CI machine gets a wide margin


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _copy(
    proc: subprocess.Popen[bytes], log: Path, ready: threading.Event, lines: list[str]
) -> None:
    """Copy the server's output to ``log``; set ``ready`` at its ready line or its exit."""
    assert proc.stdout is not None
    with log.open("a") as out:
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            out.write(line)
            out.flush()
            lines.append(line)
            if READY in line:
                ready.set()
    ready.set()


class RedisServer:
    """One ``redis-server`` process.

    Args:
        folder: where its log (and working directory) goes.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        """Start it (again, on the same port if it ran before); return once it serves.

        Raises:
            pytest.fail: no ``redis-server`` binary, or it did not start.
        """
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(
                "redis-server is not installed: `make install` installs it (as root: "
                "apt-get install redis-server); the shared-limits tests need a real Redis",
                pytrace=False,
            )
        output: list[str] = []
        for _ in range(5):  # a free port taken by someone else meanwhile: try another
            port = self.port or _free_port()
            argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", str(self.folder)]  # fmt: skip
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            ready = threading.Event()
            output = []
            threading.Thread(
                target=_copy, args=(self.proc, self.folder / f"redis-{port}.log", ready, output),
                name=f"redis-{port}-output", daemon=True,
            ).start()  # fmt: skip
            if ready.wait(START_TIMEOUT_S) and self.proc.poll() is None:
                self.port = port
                return self
            self.stop()
            if self.port or not any("Address already in use" in line for line in output):
                break
        pytest.fail("redis-server did not start; its output:\n" + "".join(output), pytrace=False)

    def stop(self) -> None:
        """Stop it by its PID (SIGTERM, then SIGKILL after 10 s)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
