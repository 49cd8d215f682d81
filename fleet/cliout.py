"""How the inspection commands print: ``-o table|wide|json|yaml``, ``--watch``, and colour.

A command hands :func:`show` a ``fetch`` (no arguments, returns JSON-able data) and a
``render`` (data and ``wide`` to a rich renderable). ``json`` and ``yaml`` print the data as
fetched; ``table`` renders it, ``wide`` renders it with more columns. Colour is used only when
stdout is a terminal and ``NO_COLOR`` is unset or empty (https://no-color.org); elsewhere the
output is plain text at full width without trailing spaces (rich pads every cell to its column's
width), so scripts can cut it.

``--watch`` fetches again every ``--interval`` seconds: on a terminal a table is redrawn in
place (rich ``Live``), elsewhere every round is printed after the last (JSON as one compact
document per line, YAML as ``---``-separated documents). Ctrl-C ends it with status 0. A fetch
that fails during a watch is shown and retried; only the first one ends the command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Any, cast

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from fleet.protocol.errors import FleetError

FORMATS = ("table", "wide", "json", "yaml")
PIPE_WIDTH = 1000
"""Columns of a table printed to a pipe or file: wide enough never to fold a cell."""

Render = Callable[[Any, bool], RenderableType]

_STATE_STYLES = {
    "ready": "green",
    "healthy": "green",
    "cached": "green",
    "starting": "yellow",
    "fetching": "yellow",
    "assigned": "yellow",
    "draining": "yellow",
    "stopping": "yellow",
    "failed": "red",
    "crashed": "red",
    "unhealthy": "red",
    "lost": "red",
    "unplaced": "red",
}


def add_output_args(p: argparse.ArgumentParser, *, watch: bool = True) -> None:
    """``-o/--output`` and, with ``watch``, ``-w/--watch`` and ``--interval``."""
    p.add_argument(
        "-o",
        "--output",
        choices=FORMATS,
        default="table",
        help="table, wide (more columns), json or yaml (default %(default)s)",
    )
    if watch:
        p.add_argument(
            "-w",
            "--watch",
            action="store_true",
            help="show it again every --interval seconds until Ctrl-C (in place on a terminal)",
        )
        p.add_argument(
            "--interval",
            type=_positive_seconds,
            default=2.0,
            metavar="S",
            help="seconds between two rounds of --watch (default %(default)s)",
        )


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, not {text!r}")
    return value


def use_colour(stream: IO[str] | None = None) -> bool:
    """True when ``stream`` (default stdout) is a terminal and ``NO_COLOR`` is unset or empty."""
    stream = sys.stdout if stream is None else stream
    return stream.isatty() and not os.environ.get("NO_COLOR")


def console(stream: IO[str] | None = None) -> Console:
    """A rich console on ``stream`` (default stdout): coloured only where :func:`use_colour`
    says so; on a pipe, no styles at all, no width limit and no trailing spaces."""
    stream = sys.stdout if stream is None else stream
    tty = stream.isatty()
    return Console(
        file=stream if tty else cast(IO[str], StripTrailing(stream)),
        color_system="auto" if use_colour(stream) else None,
        highlight=False,
        width=None if tty else PIPE_WIDTH,
        force_terminal=tty,
    )


class StripTrailing:
    """A text stream that writes each line to ``stream`` without its trailing whitespace.

    A flush writes what it can of an unfinished line and holds back only its trailing
    whitespace, which is dropped if the line ends there and written if text follows.
    """

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self._held = ""  # trailing whitespace of the unfinished line, not written yet

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", None) or "utf-8"

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        *lines, last = (self._held + text).split("\n")
        out = "".join(line.rstrip() + "\n" for line in lines)
        kept = last.rstrip()
        self._held = last[len(kept) :]
        self.stream.write(out + kept)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def dump(data: Any, output: str) -> str:
    """``data`` as ``json`` (indented) or ``yaml`` text, without a final newline."""
    if output == "json":
        return json.dumps(data, indent=2)
    if output == "yaml":
        import yaml

        return str(yaml.safe_dump(data, sort_keys=False, allow_unicode=True)).rstrip("\n")
    raise ValueError(f"not a data format: {output}")


def cell(value: object) -> str:
    """One table cell: ``-`` for nothing, lists comma-separated."""
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "-"
    return "-" if value is None or value == "" else str(value)


def state(value: str) -> Text:
    """A state word, coloured by what it means (green ready, yellow on its way, red broken)."""
    return Text(value or "-", style=_STATE_STYLES.get(value, ""))


def yes_no(value: object, *, bad_when: bool) -> Text:
    """``yes``/``no``, red when it equals ``bad_when``."""
    return Text("yes" if value else "no", style="red" if bool(value) == bad_when else "")


def table(columns: Sequence[str], rows: Iterable[Sequence[RenderableType]]) -> Table:
    """A borderless table with upper-case headers."""
    out = Table(box=None, header_style="bold", pad_edge=False)
    for column in columns:
        out.add_column(column.upper())
    for row in rows:
        out.add_row(*row)
    return out


def show(args: argparse.Namespace, fetch: Callable[[], Any], render: Render) -> int:
    """Print what ``fetch`` returns in ``args.output``, once or, with ``args.watch``, until
    Ctrl-C. Returns the exit status (0).

    Raises:
        FleetError: the first fetch failed.
    """
    data = fetch()
    if not getattr(args, "watch", False):
        _emit(console(), data, args.output, render, stream=False)
        return 0
    try:
        _watch(fetch, render, data, args.output, args.interval)
    except KeyboardInterrupt:
        pass
    return 0


def _emit(con: Console, data: Any, output: str, render: Render, *, stream: bool) -> None:
    if output == "json" and stream:
        print(json.dumps(data), flush=True)
    elif output in ("json", "yaml"):
        print(("---\n" if stream else "") + dump(data, output), flush=True)
    else:
        con.print(render(data, output == "wide"))
        if stream:
            con.print()
        con.file.flush()


def _watch(fetch: Callable[[], Any], render: Render, data: Any, output: str, every: float) -> None:
    con = console()
    if not (con.is_terminal and output in ("table", "wide")):
        while True:
            _emit(con, data, output, render, stream=True)
            time.sleep(every)
            data = _again(fetch, data, on_error=_print_error)
    from rich.live import Live

    wide = output == "wide"
    error: list[str] = []

    def view() -> RenderableType:
        stamp = time.strftime("%H:%M:%S")
        head = Text(f"every {every:g} s, {stamp}; Ctrl-C to stop", style="dim")
        parts: list[RenderableType] = [head]
        if error:
            parts.append(Text(f"fleet: {error[-1]} (showing the last answer)", style="red"))
        return Group(*parts, render(data, wide))

    with Live(view(), console=con, auto_refresh=False, transient=False) as live:
        while True:
            time.sleep(every)
            error.clear()
            data = _again(fetch, data, on_error=error.append)
            live.update(view(), refresh=True)


def _again(fetch: Callable[[], Any], last: Any, *, on_error: Callable[[str], object]) -> Any:
    """A new fetch, or ``last`` when it fails (the error goes to ``on_error``)."""
    try:
        return fetch()
    except FleetError as exc:
        on_error(str(exc))
        return last


def _print_error(message: str) -> None:
    print(f"fleet: error: {message}", file=sys.stderr, flush=True)


__all__ = [
    "FORMATS",
    "StripTrailing",
    "add_output_args",
    "cell",
    "console",
    "dump",
    "show",
    "state",
    "table",
    "use_colour",
    "yes_no",
]
