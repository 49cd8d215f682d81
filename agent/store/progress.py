"""Progress of one model fetch: bytes done of total, rate over a recent window, ETA. Sans-I/O."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

FetchState = Literal["listing", "downloading", "failed"]


@dataclass(frozen=True)
class FetchProgress:
    """A snapshot of one fetch, as the agent reports it.

    Attributes:
        uri: the source.
        state: ``listing``, ``downloading`` or ``failed``.
        bytes_done: bytes on disk and accepted (a resumed download starts above 0).
        bytes_total: the model's size (0 while listing).
        files_done: files complete and verified.
        files_total: files in the manifest.
        rate_bps: bytes per second over the last ``window_s``.
        eta_s: seconds left at that rate, or None when the rate is 0.
        error: the last failure's reason ("" while none).
    """

    uri: str
    state: FetchState
    bytes_done: int = 0
    bytes_total: int = 0
    files_done: int = 0
    files_total: int = 0
    rate_bps: float = 0.0
    eta_s: float | None = None
    error: str = ""

    def describe(self) -> str:
        """One line for an engine's status: ``fetching URI: 1.2/4.0 GiB, 50 MiB/s, ETA 56 s``."""
        if self.state == "listing":
            return f"fetching {self.uri}: listing files"
        text = f"fetching {self.uri}: {_size(self.bytes_done)}/{_size(self.bytes_total)}"
        if self.rate_bps > 0:
            text += f", {_size(self.rate_bps)}/s"
        if self.eta_s is not None:
            text += f", ETA {self.eta_s:.0f} s"
        return text


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class ProgressMeter:
    """Counts the bytes of one fetch and derives its rate and ETA.

    Args:
        uri: the source.
        window_s: how far back the rate looks.
    """

    def __init__(self, uri: str, *, window_s: float = 10.0) -> None:
        self.uri = uri
        self.window_s = window_s
        self.state: FetchState = "listing"
        self.bytes_done = 0
        self.bytes_total = 0
        self.files_done = 0
        self.files_total = 0
        self.error = ""
        self._samples: deque[tuple[float, int]] = deque()

    def begin(self, *, bytes_total: int, files_total: int, now: float) -> None:
        """The manifest is known; downloading starts."""
        self.state = "downloading"
        self.bytes_total = bytes_total
        self.files_total = files_total
        self._samples.clear()
        self._samples.append((now, self.bytes_done))

    def resumed(self, nbytes: int) -> None:
        """``nbytes`` were already on disk (a resumed download); they do not count as rate."""
        self.bytes_done += nbytes
        if self._samples:
            t, done = self._samples[-1]
            self._samples[-1] = (t, done + nbytes)

    def add(self, nbytes: int, now: float) -> None:
        """``nbytes`` more arrived at ``now``."""
        self.bytes_done += nbytes
        self._samples.append((now, self.bytes_done))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window_s:
            self._samples.popleft()

    def file_done(self) -> None:
        """One more file is complete and verified."""
        self.files_done += 1

    def failed(self, reason: str) -> None:
        """The fetch failed with ``reason``."""
        self.state = "failed"
        self.error = reason

    def snapshot(self, now: float) -> FetchProgress:
        """The fetch as of ``now``."""
        rate = 0.0
        if self._samples:
            t0, b0 = self._samples[0]
            if now > t0:
                rate = (self.bytes_done - b0) / (now - t0)
        left = max(self.bytes_total - self.bytes_done, 0)
        eta = (
            left / rate if rate > 0 else (0.0 if self.state == "downloading" and not left else None)
        )
        return FetchProgress(
            uri=self.uri,
            state=self.state,
            bytes_done=self.bytes_done,
            bytes_total=self.bytes_total,
            files_done=self.files_done,
            files_total=self.files_total,
            rate_bps=rate,
            eta_s=eta,
            error=self.error,
        )


__all__ = ["FetchProgress", "FetchState", "ProgressMeter"]
