"""Progress of long operations (``deploy --wait``, ``models prestage --wait``, ``fleet up``):
rich progress bars on a terminal, one plain line per change elsewhere (a log or CI keeps a
readable record instead of redrawn bars)."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from fleet.cliout import console


class Tracker:
    """Bars keyed by name: :meth:`update` creates or moves one.

    Resource handling: on a terminal it owns a rich ``Progress`` display from ``__enter__`` to
    ``__exit__`` (it stops on the way out, also on an error); elsewhere it only prints.
    """

    def __init__(self, con: Console | None = None) -> None:
        self.console = con or console()
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._said: dict[str, str] = {}

    def __enter__(self) -> Tracker:
        if self.console.is_terminal:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                console=self.console,
            )
            self._progress.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def print(self, text: str) -> None:
        """A line above the bars (or just a line)."""
        self.console.print(text, highlight=False, markup=False)
        self.console.file.flush()

    def update(self, key: str, description: str, done: float, total: float | None) -> None:
        """Move bar ``key`` to ``done`` of ``total`` (None: not known yet). ``description``
        says it in words (``demo: 1/2 ready``); off a terminal it is printed when it changes."""
        if self._progress is None:
            if self._said.get(key) != description:
                self._said[key] = description
                self.print(description)
            return
        task = self._tasks.get(key)
        if task is None:
            task = self._tasks[key] = self._progress.add_task(description, total=total)
        self._progress.update(task, description=description, completed=done, total=total)


__all__ = ["Tracker"]
