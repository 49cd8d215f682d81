"""The agent's reaper: no engine process outlives the agent, however the agent dies.

An engine's API server is the agent's child and gets SIGKILL when the agent dies
(``PR_SET_PDEATHSIG``), but vLLM's EngineCore and workers are *its* children: with the agent
SIGKILLed they would be orphaned, each holding gigabytes (and, on a GPU node, the GPU). Each
engine leads its own process group, so the reaper, a tiny process in its own session, is told
over a pipe which groups are engines (``+PGID`` / ``-PGID`` lines). When the pipe closes, because
the agent exited for whatever reason, it SIGKILLs every group still listed and exits.

``python -m fleet.agent.reaper`` is the reaper; :class:`Reaper` is the agent's side.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

log = logging.getLogger(__name__)


def main() -> None:
    """Read ``+PGID`` / ``-PGID`` lines until EOF, then kill the groups left."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the terminal is the agent's
    groups: set[int] = set()
    for line in sys.stdin:
        try:
            op, pgid = line[0], int(line[1:])
        except (IndexError, ValueError):
            continue
        if op == "+":
            groups.add(pgid)
        elif op == "-":
            groups.discard(pgid)
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass


class Reaper:
    """The agent's handle on its reaper process (started on construction).

    Raises:
        OSError: the reaper cannot be started.
    """

    def __init__(self) -> None:
        self._proc = subprocess.Popen(  # noqa: ASYNC220 - a one-off fork at agent start
            [sys.executable, "-m", "fleet.agent.reaper"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # a kill of the agent's group must not take it too
        )
        self.pid = self._proc.pid

    def _tell(self, line: str) -> None:
        stdin = self._proc.stdin
        if stdin is None or stdin.closed:
            return
        try:
            stdin.write(line.encode())
            stdin.flush()
        except OSError as exc:  # the reaper died: engines are then only as safe as before
            log.error("the reaper (pid %d) is gone: %s", self.pid, exc)

    def watch(self, pgid: int) -> None:
        """Kill process group ``pgid`` if the agent dies."""
        self._tell(f"+{pgid}\n")

    def forget(self, pgid: int) -> None:
        """The group ended (or was killed) under supervision: leave it alone."""
        self._tell(f"-{pgid}\n")

    def close(self) -> None:
        """Close the pipe (the reaper kills what is still listed and exits) and reap it."""
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


if __name__ == "__main__":
    main()

__all__ = ["Reaper", "main"]
