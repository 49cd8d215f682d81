"""The simulator's process entry point: parse vLLM's argv, serve, exit like vLLM would.

* A bad command line exits with status 2 (argparse's usage error), a bad value with status 2 and
  one line naming the flag.
* The ``crash`` fault given at start exits with status 1 before anything is bound.
* Once serving, one line ``fleet-sim: serving MODEL at URL`` goes to stdout (the bound port when
  ``--port 0``), flushed, so a parent can wait for it instead of polling.
* SIGTERM and SIGINT stop it cleanly (status 0); the agent's supervisor escalates to SIGKILL
  itself.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence

import trio

from fleet.protocol.errors import ConfigError

from .api import CRASH_STATUS
from .config import SimConfig, parse_args
from .server import SimServer

log = logging.getLogger("fleet.agent.sim")


async def serve(cfg: SimConfig) -> None:
    """Run one simulated engine until SIGTERM or SIGINT."""
    server = SimServer(cfg)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(server.run)
            print(f"fleet-sim: serving {cfg.model_name} at {url}", flush=True)
            async for signum in signals:
                log.info("signal %d: stopping", signum)
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator; return the process exit status."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"fleet-sim: error: {exc}", file=sys.stderr)
        return 2
    if cfg.ignored_args:
        log.info("ignoring vLLM arguments the simulator does not model: %s", cfg.ignored_args)
    if cfg.faults.crash:
        print("fleet-sim: crash fault: exiting with status 1", file=sys.stderr, flush=True)
        return CRASH_STATUS
    trio.run(serve, cfg)
    return 0


__all__ = ["main", "serve"]
