"""Regenerate the CLI screenshots of README.md (docs/img/cli-*.svg) from a real fleet.

Starts ``fleet up --engine sim --replicas 2`` on four fake GPUs (one per engine) with the
demo model, sends a few requests so the KV index has blocks, renders each command's table as
the CLI does, on a recording rich console, and saves it as SVG (rich's ``save_svg``). Then it
stops the fleet. Run from the repository root::

    python tools/cli_screenshots.py [--out docs/img]
"""

from __future__ import annotations

import argparse
import io
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from fleet.cliconn import call
from fleet.cliinspect import fetch_node, render_engines, render_node, render_nodes
from fleet.clikv import fetch_kv_stats, render_explain, render_kv_stats
from fleet.deploycli import render as render_deployments

WIDTH = 124
START_TIMEOUT_S = 120.0


def start_fleet(model: Path, log_dir: Path) -> tuple[subprocess.Popen[str], str]:
    """``fleet up`` in the background; its process and coordinator URL once it serves."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleet", "up", "--engine", "sim", "--replicas", "2",
         "--model", str(model), "--fake-gpus", "4x80GiB@h100", "--gpus-per-engine", "1",
         "--port", "0", "--log-dir", str(log_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    url = ""
    deadline = time.monotonic() + START_TIMEOUT_S
    for line in proc.stdout:  # bounded: fleet up prints a status line every 5 s
        if "coordinator listening on" in line:
            url = line.split()[-1]
        if "Fleet is serving" in line:
            return proc, url
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit("fleet up did not serve in time")


def shoot(out: Path, name: str, title: str, renderable: Any) -> None:
    """Render ``renderable`` under a ``$ title`` prompt line into ``out/cli-NAME.svg``."""
    console = Console(record=True, width=WIDTH, force_terminal=True, color_system="truecolor",
                      file=io.StringIO())  # fmt: skip
    console.print(f"[bold]$[/] {title}", highlight=False)
    console.print(renderable)
    console.save_svg(str(out / f"cli-{name}.svg"), title=title)
    print(f"wrote {out / f'cli-{name}.svg'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from fleet.demomodel import build_demo_model

    with tempfile.TemporaryDirectory() as tmp:
        model = build_demo_model(Path(tmp) / "demo")
        proc, url = start_fleet(model, Path(tmp) / "logs")
        try:
            prompt = "Fleet routes each request to the engine holding its prefix. " * 12
            for _ in range(3):
                httpx.post(url + "/v1/completions", timeout=60,
                           json={"model": "demo", "prompt": prompt, "max_tokens": 8})  # fmt: skip
            time.sleep(1.0)  # KV events and a heartbeat arrive
            shots: list[tuple[str, str, Callable[[], Any]]] = [
                ("engines", "fleet engines -o wide",
                 lambda: render_engines(call(url, "/api/v1/engines"), True)),
                ("nodes", "fleet nodes", lambda: render_nodes(call(url, "/api/v1/nodes"), False)),
                ("node-inspect", "fleet node inspect local",
                 lambda: render_node(fetch_node(url, "local"), False)),
                ("kv-stats", "fleet kv stats",
                 lambda: render_kv_stats(fetch_kv_stats(url, ""), False)),
                ("route-explain", "fleet route explain --prompt '...'",
                 lambda: render_explain(call(url, "/api/v1/route/explain", "",
                                             {"model": "demo", "prompt": prompt}), False)),
                ("deployments", "fleet deployments",
                 lambda: render_deployments(call(url, "/admin/v1/deployments"), False)),
            ]  # fmt: skip
            for name, title, render in shots:
                shoot(args.out, name, title, render())
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


if __name__ == "__main__":
    main()
