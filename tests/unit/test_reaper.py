"""The reaper: engine process groups die with the agent, even when the agent is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from .test_supervisor import _alive

AGENT = """
import subprocess, sys, time
from fleet.agent.reaper import Reaper
reaper = Reaper()
# An "engine": a group leader with a child of its own, like vLLM's API server and EngineCore.
engine = subprocess.Popen(
    ["sh", "-c", "sleep 600 & echo $!; wait"], stdout=subprocess.PIPE, start_new_session=True
)
grandchild = int(engine.stdout.readline())
done = subprocess.Popen(["sleep", "600"], start_new_session=True)  # supervised to its end
reaper.watch(engine.pid)
reaper.watch(done.pid)
done.kill(); done.wait()
reaper.forget(done.pid)
print(engine.pid, grandchild, reaper.pid, flush=True)
time.sleep(600)
"""


def _gone_within(pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_sigkilled_agent_takes_its_engines_grandchildren_with_it() -> None:
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert agent.stdout is not None
    engine, grandchild, reaper = map(int, agent.stdout.readline().split())
    try:
        assert _alive(engine) and _alive(grandchild) and _alive(reaper)
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        # The grandchild is no child of the agent: only the reaper can have killed it.
        assert _gone_within([engine, grandchild, reaper], 5.0)
    finally:
        for pid in (engine, grandchild, reaper):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def test_a_closed_reaper_kills_nothing_it_was_told_to_forget() -> None:
    from fleet.agent.reaper import Reaper

    reaper = Reaper()
    kept = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        reaper.watch(kept.pid)
        reaper.forget(kept.pid)
        reaper.close()
        assert not _alive(reaper.pid)
        assert kept.poll() is None  # forgotten: left alone
    finally:
        kept.kill()
        kept.wait()
