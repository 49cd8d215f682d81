"""Where chaos results go: one JSON file per scenario, ``summary.json`` and ``summary.md``.

The markdown table is what ``chaos/README.md`` quotes: one row per scenario with the common
figures, the scenario's own key numbers, and the targets it missed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fleet.bench.report import machine, table

from .scenarios import Figures

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = (
    "scenario",
    "sent",
    "succeeded",
    "failed",
    "lost",
    "broken",
    "p50 ms",
    "p99 ms",
    "detect s",
    "recover s",
    "its own numbers",
    "targets",
)
HIGHLIGHTS: dict[str, tuple[str, ...]] = {
    "engine-sigkill": ("ready_s", "streams_hit", "streams_resumed", "long_stream_outcomes"),
    "engine-hang": ("stopped_s", "ready_s", "streams_hit", "streams_resumed", "failed_by_status"),
    "kv-events": (
        "blocks_held",
        "control_missing",
        "control_stale",
        "idle_missing",
        "idle_stale",
        "final_missing",
        "final_stale",
    ),
    "overload": (
        "capacity_rps",
        "burst_rps",
        "offered_rps",
        "goodput_rps",
        "goodput_ratio",
        "rejected_503",
        "rejected_503_no_retry_after",
        "listen_overflows",
    ),
    "malformed-http": ("cases", "cases_unacceptable", "framing_bare_4xx", "drained_s"),
    "malformed-wire": ("link_frames_sent", "link_rejected", "relay_frames_sent", "relay_rejected"),
    "coordinator-kill": (
        "coordinators",
        "held_by_killed",
        "gone_s",
        "takeover_s",
        "restarted_s",
    ),
    "scale-down": ("scaled", "long_streams", "streams_on_removed", "drained_s", "streams_resumed"),
}


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_cell(v)}" for k, v in value.items()) or "—"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def highlights(figures: Figures) -> str:
    """A scenario's own key numbers, as ``name=value`` pairs."""
    keys = HIGHLIGHTS.get(str(figures.get("scenario")), ())
    return "; ".join(f"{k}={_cell(figures.get(k))}" for k in keys if k in figures)


def row(figures: Figures) -> list[str]:
    """One table row (:data:`COLUMNS`)."""
    missed = figures.get("missed", [])
    return [
        _cell(figures.get("scenario")),
        _cell(figures.get("sent")),
        _cell(figures.get("succeeded")),
        _cell(figures.get("failed")),
        _cell(figures.get("lost")),
        _cell(figures.get("broken")),
        _cell(figures.get("p50_ms")),
        _cell(figures.get("p99_ms")),
        _cell(figures.get("detect_s")),
        _cell(figures.get("recover_s")),
        highlights(figures),
        "met" if not missed else "MISSED: " + "; ".join(missed),
    ]


def markdown(results: Sequence[Figures]) -> str:
    """The summary table in GitHub markdown."""
    rows = [[c.replace("|", "\\|") for c in row(f)] for f in results]
    return table(COLUMNS, rows)


def write(results: Sequence[Figures], out: Path | None = None) -> Path:
    """Write every scenario's JSON, ``summary.json`` and ``summary.md`` into ``out``.

    Returns:
        The folder written.
    """
    folder = out or RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    for figures in results:
        path = folder / f"{figures['scenario']}.json"
        path.write_text(json.dumps(figures, indent=2) + "\n")
    summary = {"machine": machine(), "results": list(results)}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (folder / "summary.md").write_text(markdown(results) + "\n")
    return folder


__all__ = ["COLUMNS", "RESULTS", "highlights", "markdown", "row", "write"]
