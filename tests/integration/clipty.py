"""Run a command on a pseudo-terminal (os.openpty) and read what it draws, with timeouts."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Callable, Mapping, Sequence


def ctrl_c_default() -> None:
    """Give the child Ctrl-C's default (a ``preexec_fn``): a parent that ignores SIGINT (a
    background job of a non-interactive shell, as a CI runner may start the suite) passes the
    ignoring on through exec, and Python then leaves SIGINT ignored, unlike at a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_in_pty(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    until: Callable[[bytes], bool],
    timeout_s: float,
    interrupt: bool = True,
    columns: int = 200,
    before_interrupt: Callable[[int], object] | None = None,
) -> tuple[bytes, int]:
    """Run ``argv`` with a terminal (``columns`` wide) as stdin, stdout and stderr; read its
    output until ``until(output)`` holds, then (with ``interrupt``) press Ctrl-C (SIGINT to
    its process group) and wait for it to exit. Returns the output and the exit status.
    ``before_interrupt`` is called with the process id once ``until`` holds (to note its
    children, say).

    Raises:
        AssertionError: ``until`` did not hold, or the process did not exit, in ``timeout_s``.
    """
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    proc = subprocess.Popen(
        list(argv), stdin=slave, stdout=slave, stderr=slave, env=dict(env),
        start_new_session=True, preexec_fn=ctrl_c_default,
    )  # fmt: skip
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + timeout_s
        while not until(out):
            if time.monotonic() > deadline:
                raise AssertionError(f"{argv}: no expected output in {timeout_s} s: {out[-800:]!r}")
            out += _read(master, 0.2)
        if before_interrupt is not None:
            before_interrupt(proc.pid)
        if interrupt:
            os.killpg(proc.pid, signal.SIGINT)
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{argv}: still running after {timeout_s} s")
            out += _read(master, 0.1)
        out += _read(master, 0.1)
        return out, proc.returncode
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        os.close(master)


def _read(fd: int, wait_s: float) -> bytes:
    ready, _, _ = select.select([fd], [], [], wait_s)
    if not ready:
        return b""
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: every writer closed the terminal
        return b""
