"""Where benchmark results go: ``bench/results/NAME/`` gets ``result.json`` and ``result.md``.

The markdown table is also what ``bench/README.md`` quotes; a PNG is written where a picture says
more (matplotlib is imported only then, from the ``bench`` extra).
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import os

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "commit": commit,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        out.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(out)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def write(name: str, result: dict[str, Any], markdown: str, *, out: Path | None = None) -> Path:
    """Write ``result.json`` and ``result.md`` for benchmark ``name``; return the folder."""
    folder = (out or RESULTS) / name
    folder.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "machine": machine(), **result}
    (folder / "result.json").write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    (folder / "result.md").write_text(markdown.rstrip() + "\n")
    return folder


def _plot(path: Path, draw: Callable[[Any], None], *, xlabel: str, ylabel: str, title: str) -> bool:
    """One PNG figure; ``draw(ax)`` adds the lines. False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    draw(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def cdf_png(path: Path, series: Mapping[str, Sequence[float]], *, xlabel: str, title: str) -> bool:
    """Plot latency CDFs; returns False (and writes nothing) without matplotlib."""

    def draw(ax: Any) -> None:
        for label, values in series.items():
            ordered = sorted(values)
            if ordered:
                ys = [(i + 1) / len(ordered) for i in range(len(ordered))]
                ax.plot(ordered, ys, label=label)

    return _plot(path, draw, xlabel=xlabel, ylabel="fraction of requests", title=title)


def lines_png(
    path: Path,
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
) -> bool:
    """Plot (x, y) series as lines; returns False (and writes nothing) without matplotlib."""

    def draw(ax: Any) -> None:
        for label, points in series.items():
            if points:
                ax.plot([x for x, _ in points], [y for _, y in points], label=label)

    return _plot(path, draw, xlabel=xlabel, ylabel=ylabel, title=title)


__all__ = ["RESULTS", "cdf_png", "lines_png", "machine", "table", "write"]
