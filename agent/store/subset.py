"""Fetch chosen files of remote model sources (a tokenizer, not the weights), verified.

The coordinator tokenizes prompts the way the engines will, so it needs a model's tokenizer
files but never its weights. :class:`SubsetFetcher` opens a source through the store's own
sources (:mod:`.opener`), keeps the listed files whose path matches one of its patterns, brings
them in with the store's :func:`~.download.download` (each checked against the source's
SHA-256, git blob id or size) and publishes them by one ``rename``. Layout under ``root``::

    subsets/KEY/…                        complete and verified; never changed again
    subsets/KEY/.fleet-subset.json       the source and the files it was verified against
    subsets/.partial-KEY-PID/model|parts  a fetch in progress in process PID

``KEY`` is the store's cache key of the URI (:func:`~.cachedir.cache_key`) plus a hash of the
patterns. Subsets live under ``subsets/``, never the store's ``entries/``: even in the model
store's own folder, a tokenizer-only folder never poses as a model the store fetched. Several
processes may share ``root`` (``fleet up --coordinators N``): each fetches into its own partial
folder and the first to publish wins; the others use its folder. An attempt that fails deletes
its partial folder (the files are small: the next attempt starts over).

Owns: its HTTP client (unless given one) while :meth:`SubsetFetcher.run` runs. Stops on
cancellation; a fetch in flight deletes its partial folder.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import trio

from fleet.protocol.errors import ConfigError
from fleet.protocol.modelsource import ModelSource

from .cachedir import cache_key
from .config import StoreConfig
from .download import download
from .errors import NotAModel, SourceNotFound, StoreError
from .manifest import Manifest
from .opener import SourceOpener
from .progress import ProgressMeter

T = TypeVar("T")

SUBSETS = "subsets"
RECORD = ".fleet-subset.json"


class SubsetFetcher:
    """Fetches the files of a source that match ``patterns`` into ``cfg.root/subsets/``.

    Args:
        cfg: the store settings: ``root``, endpoints, HTTP timeout, chunk size, ``retry``.
        patterns: ``fnmatch`` patterns of the paths to fetch (``tokenizer.json``, ``*.jinja``).
        http: an HTTP client for ``http(s)://`` sources (else :meth:`run` opens its own).

    Raises:
        ConfigError: no patterns.
    """

    def __init__(
        self,
        cfg: StoreConfig,
        patterns: Sequence[str],
        *,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        if not patterns:
            raise ConfigError("patterns", patterns, "must name at least one file")
        self.cfg = cfg
        self.patterns = tuple(patterns)
        self.folder = cfg.root / SUBSETS
        self._opener = SourceOpener(cfg)
        self._disk = trio.CapacityLimiter(cfg.disk_threads)
        self._http = http
        self._rng = random.Random()
        self._locks: dict[str, trio.Lock] = {}  # one fetch per subset at a time
        self._tag = hashlib.sha256("\n".join(sorted(self.patterns)).encode()).hexdigest()[:8]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the HTTP client until cancelled; ``started()`` at once."""
        if self._http is not None:
            task_status.started()
            await trio.sleep_forever()
        async with httpx.AsyncClient() as http:
            self._http = http
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._http = None

    def delay_s(self, failures: int) -> float:
        """How long to wait after ``failures`` failed fetches in a row (``cfg.retry``)."""
        return self.cfg.retry.delay_s(failures, self._rng)

    def path_of(self, uri: str) -> Path:
        """Where the subset of ``uri`` is (or will be) once complete."""
        return self.folder / f"{cache_key(uri)}-{self._tag}"

    async def fetch(self, uri: str) -> Path:
        """The folder holding ``uri``'s matching files, fetched and verified first if need be.

        Args:
            uri: an ``http(s)://``, ``s3://`` or ``hf://`` source.

        Returns:
            The folder (complete: every matching file the source lists).

        Raises:
            StoreError: a subclass saying why: ``SourceNotFound`` (also for a local source),
                ``SourceUnavailable``, ``ChecksumMismatch``, ``NotAModel`` (no file matches),
                ``NoSpace``, or a plain ``StoreError`` when the folder cannot be written.
            RuntimeError: :meth:`run` is not running.
        """
        try:
            src = ModelSource.parse(uri)
        except ValueError as exc:
            raise SourceNotFound(uri, f"not a model source: {exc}") from exc
        if src.scheme in ("path", "file"):
            raise SourceNotFound(uri, "a local source: nothing to fetch")
        if self._http is None:
            raise RuntimeError("the subset fetcher is not running")
        final = self.path_of(uri)
        lock = self._locks.setdefault(final.name, trio.Lock())
        async with lock:
            if await self._disk_op(uri, final.is_dir):
                return final
            return await self._fetch(uri, src, final)

    async def _fetch(self, uri: str, src: ModelSource, final: Path) -> Path:
        assert self._http is not None
        source = await self._opener.open(src, self._http)
        listed = await source.manifest()
        chosen = Manifest(tuple(f for f in listed.files if self.wants(f.path)))
        if not chosen.files:
            names = ", ".join(f.path for f in listed.files[:5])
            raise NotAModel(uri, f"no file matches {list(self.patterns)} (has: {names})")
        pdir = self.folder / f".partial-{final.name}-{os.getpid()}"
        try:
            await self._disk_op(uri, _start, pdir, final.name)
            meter = ProgressMeter(uri, window_s=self.cfg.progress_window_s)
            meter.begin(
                bytes_total=chosen.total_bytes,
                files_total=len(chosen.files),
                now=trio.current_time(),
            )
            await download(source, chosen, pdir, meter, disk=self._disk)
            record = json.dumps({"uri": uri, "manifest": json.loads(chosen.to_json())})
            await self._disk_op(uri, _publish, pdir, final, record)
            return final
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(shutil.rmtree, pdir, True, limiter=self._disk)

    def wants(self, path: str) -> bool:
        """Whether a file of the source is part of the subset."""
        return any(fnmatch.fnmatchcase(path, p) for p in self.patterns)

    async def _disk_op(self, uri: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a thread under the disk limiter; an ``OSError`` as a StoreError."""
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._disk)
        except OSError as exc:
            raise StoreError(uri, f"cannot write under {self.folder}: {exc}") from exc


def _start(pdir: Path, key: str) -> None:
    """A fresh partial folder; leftovers of ``key`` from processes that are gone deleted."""
    pdir.parent.mkdir(parents=True, exist_ok=True)
    for old in pdir.parent.glob(f".partial-{key}-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if old != pdir and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(pdir, ignore_errors=True)
    (pdir / "model").mkdir(parents=True)
    (pdir / "parts").mkdir()


def _publish(pdir: Path, final: Path, record: str) -> None:
    """Rename the verified files into place; another process having done so first is fine."""
    (pdir / "model" / RECORD).write_text(record)
    try:
        os.rename(pdir / "model", final)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not final.is_dir():
            raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


__all__ = ["SubsetFetcher"]
