"""The model store of one node: fetch a model once, keep it verified, share it, evict it.

:class:`ModelStore` turns a source URI into a local model folder. A local path or ``file://``
URI is checked (a folder with ``config.json``) and used where it is. A remote source
(``http(s)://``, ``s3://``, ``hf://``) is listed into a manifest, downloaded into
``partial/KEY`` (resuming what an earlier attempt left), verified file by file, and renamed into
``entries/KEY`` (see :mod:`.cachedir`). Concurrent fetches of one URI share one download.

The disk budget counts complete entries, leftover partial downloads and the full size of
downloads in flight; to make room the least recently used models that no holder pins are
evicted (:mod:`.lru`). A failure raises a :class:`~.errors.StoreError` and leaves no entry: a
cut transfer keeps its partial folder to resume, every other failure deletes it.

Owns: a nursery that runs the downloads (so a download outlives the first caller that asked
for it, and every waiter gets its result), and its own HTTP client unless given one. Stops on
cancellation: downloads in flight stop between chunks, their partial folders stay.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import trio

from fleet.protocol.modelsource import ModelSource

from .cachedir import CacheDir, EntryMeta, cache_key, tree_bytes
from .config import StoreConfig
from .download import download
from .errors import NoSpace, NotAModel, SourceNotFound, SourceUnavailable, StoreError
from .lru import Resident, plan_eviction
from .manifest import MODEL_MARKER, Manifest
from .opener import SourceOpener
from .progress import FetchProgress, ProgressMeter
from .retry import RetryPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedModel:
    """A complete model in the cache.

    Attributes:
        uri: its source.
        path: the model folder.
        size_bytes: its size.
        last_used: when it was last fetched or released (epoch seconds).
        pinned_by: the holders that use it now.
        verification: how its files were checked.
    """

    uri: str
    path: Path
    size_bytes: int
    last_used: float
    pinned_by: tuple[str, ...]
    verification: str


class _Flight:
    """One download, shared by everyone who asks for its URI meanwhile."""

    def __init__(self, uri: str, key: str, meter: ProgressMeter) -> None:
        self.uri = uri
        self.key = key
        self.meter = meter
        self.done = trio.Event()
        self.path: Path | None = None
        self.error: StoreError | None = None
        self.reserved_bytes = 0


class ModelStore:
    """See the module docstring for what it owns and how it stops.

    Args:
        cfg: the store's configuration.
        http: an HTTP client for ``http(s)://`` sources (else the store opens its own).
        clock: wall-clock time for last-use stamps (tests pass their own).
    """

    def __init__(
        self,
        cfg: StoreConfig,
        *,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.dir = CacheDir(cfg.root)
        self._opener = SourceOpener(cfg)  # the S3 client and the boto3/huggingface_hub limiters
        self.disk_limiter = trio.CapacityLimiter(cfg.disk_threads)
        self._http = http
        self._entries: dict[str, EntryMeta] = {}
        self._partials: dict[str, int] = {}  # leftover partial downloads not in flight
        self._pins: dict[str, set[str]] = {}
        self._flights: dict[str, _Flight] = {}
        self._failures: dict[str, FetchProgress] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read the cache folder, then serve fetches until cancelled; ``started()`` when ready."""
        entries, partials = await trio.to_thread.run_sync(
            self.dir.prepare, limiter=self.disk_limiter
        )
        self._entries = {e.key: e for e in entries}
        self._partials = partials
        own = self._http is None
        http = self._http or httpx.AsyncClient()
        try:
            async with trio.open_nursery() as nursery:
                self._http, self._nursery = http, nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            if own:
                with trio.CancelScope(shield=True):
                    await http.aclose()
                self._http = None

    # -- the API -----------------------------------------------------------------------------

    @property
    def retry(self) -> RetryPolicy:
        """The backoff callers apply between failed fetches of one model."""
        return self.cfg.retry

    async def fetch(self, uri: str, *, holder: str = "") -> Path:
        """The local model folder of ``uri``, downloaded and verified first if need be.

        Args:
            uri: a path, ``file://``, ``http(s)://``, ``s3://`` or ``hf://`` URI.
            holder: when given, the model is pinned for this holder before anything else (so
                it cannot be evicted before the caller uses it); release it with :meth:`unpin`.
                A failed or cancelled fetch unpins again.

        Returns:
            The model folder (the path itself for local sources).

        Raises:
            StoreError: a subclass saying why the model cannot be had.
            RuntimeError: the store is not running.
        """
        try:
            src = ModelSource.parse(uri)
        except ValueError as exc:
            raise SourceNotFound(uri, f"not a model source: {exc}") from exc
        if src.scheme in ("path", "file"):
            return await self._local(src)
        key = cache_key(uri)
        if holder:
            self.pin(uri, holder)
        try:
            entry = self._entries.get(key)
            if entry is not None:
                self._touch(entry)
                return self.dir.model_dir(key)
            flight = self._flights.get(key) or self._launch(uri, key, src)
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error.again()
            assert flight.path is not None
            return flight.path
        except BaseException:
            if holder:
                self.unpin(uri, holder)
            raise

    def pin(self, uri: str, holder: str) -> None:
        """Keep ``uri``'s model from eviction while ``holder`` uses it (idempotent)."""
        self._pins.setdefault(cache_key(uri), set()).add(holder)

    def unpin(self, uri: str, holder: str) -> None:
        """``holder`` no longer uses ``uri``'s model; its last use is now."""
        key = cache_key(uri)
        holders = self._pins.get(key, set())
        holders.discard(holder)
        if not holders:
            self._pins.pop(key, None)
        entry = self._entries.get(key)
        if entry is not None:
            self._touch(entry)

    def progress(self) -> tuple[FetchProgress, ...]:
        """Downloads in flight, and the last failure of URIs not fetched since."""
        now = trio.current_time()
        live = [f.meter.snapshot(now) for f in self._flights.values()]
        return tuple(live + [p for uri, p in self._failures.items() if not self._flying(uri)])

    def models(self) -> tuple[CachedModel, ...]:
        """Complete models in the cache, least recently used first."""
        return tuple(
            CachedModel(
                uri=e.uri,
                path=self.dir.model_dir(e.key),
                size_bytes=e.size_bytes,
                last_used=e.last_used,
                pinned_by=tuple(sorted(self._pins.get(e.key, ()))),
                verification=e.verification,
            )
            for e in sorted(self._entries.values(), key=lambda e: (e.last_used, e.key))
        )

    # -- fetching ----------------------------------------------------------------------------

    def _flying(self, uri: str) -> bool:
        return cache_key(uri) in self._flights

    def _launch(self, uri: str, key: str, src: ModelSource) -> _Flight:
        if self._nursery is None:
            raise RuntimeError("the model store is not running")
        flight = _Flight(uri, key, ProgressMeter(uri, window_s=self.cfg.progress_window_s))
        self._flights[key] = flight
        self._nursery.start_soon(self._fly, flight, src, name=f"fetch {uri}")
        return flight

    async def _fly(self, flight: _Flight, src: ModelSource) -> None:
        try:
            flight.path = await self._download(flight, src)
            self._failures.pop(flight.uri, None)
            log.info("model %s ready at %s", flight.uri, flight.path)
        except StoreError as exc:
            flight.error = exc
            flight.meter.failed(exc.reason)
            self._failures[flight.uri] = flight.meter.snapshot(trio.current_time())
            log.warning("model %s: %s: %s", flight.uri, exc.kind, exc.reason)
        finally:
            del self._flights[flight.key]
            if flight.path is None and flight.error is None:
                flight.error = SourceUnavailable(flight.uri, "the model store stopped")
            flight.done.set()

    async def _download(self, flight: _Flight, src: ModelSource) -> Path:
        uri, key = flight.uri, flight.key
        assert self._http is not None
        source = await self._opener.open(src, self._http)
        manifest = await source.manifest()
        if not manifest.is_model():
            names = ", ".join(f.path for f in manifest.files[:5])
            raise NotAModel(uri, f"no {MODEL_MARKER} at the top of the folder (has: {names})")
        flight.reserved_bytes = manifest.total_bytes
        await self._make_room(flight)
        pdir = self.dir.partial_dir(key)
        await trio.to_thread.run_sync(
            self.dir.start_partial, key, manifest, limiter=self.disk_limiter
        )
        self._partials.pop(key, None)
        kept = False
        try:
            await self._check_disk(uri, manifest, pdir)
            flight.meter.begin(
                bytes_total=manifest.total_bytes,
                files_total=len(manifest.files),
                now=trio.current_time(),
            )
            await download(source, manifest, pdir, flight.meter, disk=self.disk_limiter)
            meta = EntryMeta(key, uri, manifest.total_bytes, self.clock(), _checks(manifest))
            path = await trio.to_thread.run_sync(self.dir.commit, meta, limiter=self.disk_limiter)
            self._entries[key] = meta
            kept = True
            return path
        except (SourceUnavailable, trio.Cancelled):
            kept = True  # resume from here next time
            self._partials[key] = flight.meter.bytes_done
            raise
        finally:
            if not kept:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(
                        self.dir.remove_partial, key, limiter=self.disk_limiter
                    )

    async def _local(self, src: ModelSource) -> Path:
        path = Path(src.location)

        def check() -> StoreError | None:
            if not path.is_dir():
                return SourceNotFound(src.uri, f"{path} is not a folder")
            if not (path / MODEL_MARKER).is_file():
                return NotAModel(src.uri, f"{path} has no {MODEL_MARKER}")
            return None

        error = await trio.to_thread.run_sync(check, limiter=self.disk_limiter)
        if error is not None:
            raise error
        return path

    # -- space -------------------------------------------------------------------------------

    async def _make_room(self, flight: _Flight) -> None:
        """Evict least recently used unpinned models until ``flight`` fits the budget."""
        if not self.cfg.budget_bytes:
            return
        residents = [
            Resident(e.key, e.size_bytes, e.last_used, pinned=bool(self._pins.get(e.key)))
            for e in self._entries.values()
        ]
        residents += [Resident(k, n, 0.0) for k, n in self._partials.items() if k != flight.key]
        residents += [
            Resident(f"flight:{f.key}", f.reserved_bytes, 0.0, pinned=True)
            for f in self._flights.values()
            if f is not flight
        ]
        plan = plan_eviction(
            residents, need_bytes=flight.reserved_bytes, budget_bytes=self.cfg.budget_bytes
        )
        if not plan.fits:
            raise NoSpace(
                flight.uri,
                f"needs {flight.reserved_bytes} bytes; budget {self.cfg.budget_bytes}, "
                f"{plan.used_bytes} used, {plan.freeable_bytes} evictable (the rest is pinned "
                "or downloading)",
            )
        for key in plan.evict:
            entry = self._entries.pop(key, None)
            self._partials.pop(key, None)
            log.info("evicting %s (%s) to make room", key, entry.uri if entry else "partial")
            remove = self.dir.remove_entry if entry is not None else self.dir.remove_partial
            await trio.to_thread.run_sync(remove, key, limiter=self.disk_limiter)

    async def _check_disk(self, uri: str, manifest: Manifest, pdir: Path) -> None:
        def measure() -> tuple[int, int]:
            return shutil.disk_usage(self.dir.root).free, tree_bytes(pdir)

        free, have = await trio.to_thread.run_sync(measure, limiter=self.disk_limiter)
        need = max(manifest.total_bytes - have, 0)
        if free - need < self.cfg.min_free_bytes:
            raise NoSpace(
                uri,
                f"disk full: {need} more bytes needed, {free} free, "
                f"{self.cfg.min_free_bytes} must stay free",
            )

    def _touch(self, entry: EntryMeta) -> None:
        updated = replace(entry, last_used=self.clock())
        self._entries[entry.key] = updated
        if self._nursery is not None:
            self._nursery.start_soon(self._persist, updated)

    async def _persist(self, meta: EntryMeta) -> None:
        if self._entries.get(meta.key) is not meta:
            return  # evicted or touched again meanwhile
        try:
            await trio.to_thread.run_sync(self.dir.touch, meta, limiter=self.disk_limiter)
        except OSError as exc:  # a lost last-use stamp only ages the entry
            log.warning("cannot record the use of %s: %s", meta.uri, exc)


def _checks(manifest: Manifest) -> str:
    counts = Counter(f.verification for f in manifest.files)
    return ", ".join(f"{kind}: {n}" for kind, n in sorted(counts.items()))


__all__ = ["CachedModel", "ModelStore"]
