"""A stand-in engine process for supervisor tests: takes vLLM's flags, misbehaves on request.

``FAKE_ENGINE_MODE``:
- ``ok``: serve ``GET /health`` with 200 until killed.
- ``exit0``: become healthy, then exit with status 0 after ``FAKE_ENGINE_EXIT_AFTER_S``.
- ``hang``: become healthy, then stop answering (the process lives on).
- ``stubborn``: like ``ok`` but ignore SIGTERM.
Each run also starts a child (like vLLM's engine core) that sleeps, so group kills are visible;
its pid is written to ``FAKE_ENGINE_CHILD_FILE`` if set.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODE = os.environ.get("FAKE_ENGINE_MODE", "ok")
HUNG = threading.Event()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if HUNG.is_set():
            time.sleep(3600)
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args, _ = parser.parse_known_args()
    if MODE == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    child_file = os.environ.get("FAKE_ENGINE_CHILD_FILE")
    if child_file:
        with open(child_file, "a") as f:
            f.write(f"{child.pid}\n")
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    after = float(os.environ.get("FAKE_ENGINE_EXIT_AFTER_S", "0.5"))
    if MODE == "exit0":
        time.sleep(after)
        os._exit(0)
    if MODE == "hang":
        time.sleep(after)
        HUNG.set()
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
