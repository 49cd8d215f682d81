"""The tokenizer files of remote models, fetched so the coordinator can route by prefix.

The coordinator tokenizes each prompt as the engine will (:mod:`.router.prompt`), from a model
folder. A deployment whose source is remote (``hf://``, ``s3://``, ``http(s)://``) has no folder
on the coordinator: each agent fetches the whole model into its own store. :class:`Tokenizers`
fetches just the tokenizer files of every remote source a deployment names, in the background,
through a :class:`FileFetcher` — ``fleet.agent.store.SubsetFetcher``, the model store's own
sources and checks, handed in by the CLI (the coordinator never imports the agent) — and gives
each served name of that source its folder once the files are in
(:meth:`~.router.prompt.PromptTokenizer.set_folder`). Until then the model's requests route
without prefix matching; no request ever waits for a fetch.

A failed fetch is retried with the fetcher's backoff for as long as a deployment names the
source. Each cause is logged once as a warning (repeats at debug) and counted in
``fleet_tokenizer_fetch_failures_total{kind}``; ``fleet_tokenizer_ready{source}`` is 0 while a
source is fetched and 1 once its tokenizer is in, and a log line says so. A source no deployment
names any more stops being fetched.

:class:`TokenizerBook` is the sans-I/O core: which sources to fetch, their failures, which
served names get which folder. :class:`Tokenizers` does the I/O.

Owns: a nursery with the fetcher and one task per source being fetched. Stops on cancellation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import trio

from fleet.protocol.errors import FleetError
from fleet.protocol.modelsource import ModelSource

from .deployment import Deployment
from .metrics import CoordinatorMetrics
from .router.prompt import PromptTokenizer

log = logging.getLogger(__name__)

REMOTE = ("http", "https", "s3", "hf")


class FileFetcher(Protocol):
    """Fetches the tokenizer files of a remote source (``fleet.agent.store.SubsetFetcher``)."""

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None:
        """Hold what fetches need (an HTTP client) until cancelled; ``started()`` when ready."""
        ...

    async def fetch(self, uri: str) -> Path:
        """The local folder of ``uri``'s tokenizer files, fetched and verified first if need be.

        Raises:
            FleetError: why not (a ``StoreError``, with ``kind`` and ``reason``).
        """
        ...

    def delay_s(self, failures: int) -> float:
        """How long to wait after ``failures`` failed fetches in a row."""
        ...


def is_remote(model_path: str) -> bool:
    """Whether a deployment's ``model_path`` is a source URI its agents fetch."""
    try:
        return ModelSource.parse(model_path).scheme in REMOTE
    except ValueError:
        return False


@dataclass
class TokenizerBook:
    """Which remote sources need tokenizer files, and how their fetches went. Sans-I/O.

    Attributes:
        wanted: the remote sources the deployments name now.
        folders: source → its tokenizer folder, once fetched (kept when no deployment names it
            any more: fetched files stay valid).
        failures: source → failed fetches in a row.
        causes: source → the last failure's cause.
    """

    wanted: set[str] = field(default_factory=set)
    folders: dict[str, str] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    causes: dict[str, str] = field(default_factory=dict)

    def want(self, model_paths: Iterable[str]) -> tuple[list[str], list[str]]:
        """Take the deployments' model paths as they are now.

        Returns:
            The remote sources to start fetching (newly named, not fetched before), and those no
            deployment names any more (stop fetching them).
        """
        remote = {p for p in model_paths if is_remote(p)}
        start = sorted(remote - self.wanted - self.folders.keys())
        dropped = sorted(self.wanted - remote)
        for uri in dropped:
            self.failures.pop(uri, None)
            self.causes.pop(uri, None)
        self.wanted = remote
        return start, dropped

    def pending(self) -> list[str]:
        """The wanted sources not fetched yet."""
        return sorted(self.wanted - self.folders.keys())

    def failed(self, uri: str, cause: str) -> tuple[int, bool]:
        """A fetch of ``uri`` failed: the failures in a row now, and whether ``cause`` is new
        (to be logged as a warning; a repeat of the last cause is not)."""
        n = self.failures[uri] = self.failures.get(uri, 0) + 1
        new = self.causes.get(uri) != cause
        self.causes[uri] = cause
        return n, new

    def arrived(self, uri: str, folder: str) -> None:
        """``uri``'s tokenizer files are in ``folder``."""
        self.folders[uri] = folder
        self.failures.pop(uri, None)
        self.causes.pop(uri, None)

    def assignments(self, model_paths: Mapping[str, str]) -> list[tuple[str, str]]:
        """(served name, folder) for each name whose tokenizer is a fetched source.

        Args:
            model_paths: served name → model path (:attr:`PromptTokenizer.model_paths`).
        """
        return [(n, self.folders[p]) for n, p in sorted(model_paths.items()) if p in self.folders]


class Tokenizers:
    """Fetches remote sources' tokenizer files for ``prompt``; see the module docstring.

    Args:
        prompt: the coordinator's tokenizers, given each fetched folder.
        fetcher: what fetches; None: nothing is fetched (remote models route without prefix
            matching, as they did before).
        metrics: where ``fleet_tokenizer_*`` go.
    """

    def __init__(
        self,
        prompt: PromptTokenizer,
        fetcher: FileFetcher | None,
        metrics: CoordinatorMetrics,
    ) -> None:
        self.prompt = prompt
        self.fetcher = fetcher
        self.metrics = metrics
        self.book = TokenizerBook()
        self._nursery: trio.Nursery | None = None
        self._scopes: dict[str, trio.CancelScope] = {}
        self._gauged: set[str] = set()  # sources fleet_tokenizer_ready has a sample of
        self._changed = trio.Event()

    def want(self, deployments: Iterable[Deployment]) -> None:
        """Fetch the tokenizers of the remote sources ``deployments`` name (call it with every
        deployment, whenever they change): new ones start, dropped ones stop, names already
        fetched get their folder."""
        start, dropped = self.book.want(d.model_path for d in deployments)
        for uri in dropped:
            scope = self._scopes.pop(uri, None)
            if scope is not None:
                scope.cancel()
            if uri in self._gauged:
                self._gauged.discard(uri)
                self.metrics.tokenizer_ready.remove(uri)
        self._assign()
        if self.fetcher is None:
            for uri in start:
                log.info("no tokenizer fetcher: %s routes without prefix matching", uri)
            return
        for uri in self.book.wanted:
            self.metrics.tokenizer_ready.labels(source=uri).set(uri in self.book.folders)
            self._gauged.add(uri)
        if self._nursery is not None:
            for uri in start:
                self._start(uri)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fetch what is wanted, now and as :meth:`want` adds, until cancelled."""
        if self.fetcher is None:
            task_status.started()
            return
        async with trio.open_nursery() as nursery:
            await nursery.start(self.fetcher.run)
            self._nursery = nursery
            try:
                for uri in self.book.pending():
                    self._start(uri)
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._nursery = None

    @property
    def fetching(self) -> frozenset[str]:
        """The sources being fetched now (retries included)."""
        return frozenset(self._scopes)

    async def changed(self) -> None:
        """Wait until a fetch next fails, a tokenizer arrives or a fetch stops."""
        await self._changed.wait()

    def _bump(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _assign(self) -> None:
        for name, folder in self.book.assignments(self.prompt.model_paths):
            self.prompt.set_folder(name, folder)

    def _start(self, uri: str) -> None:
        assert self._nursery is not None
        if uri in self._scopes:
            return
        scope = self._scopes[uri] = trio.CancelScope()
        self._nursery.start_soon(self._fetch, uri, scope, name=f"tokenizer of {uri}")

    async def _fetch(self, uri: str, scope: trio.CancelScope) -> None:
        """Fetch ``uri``'s tokenizer until it is in (or the scope is cancelled)."""
        fetcher = self.fetcher
        assert fetcher is not None
        try:
            with scope:
                while True:
                    try:
                        folder = await fetcher.fetch(uri)
                    except FleetError as exc:  # the store's errors: kind and reason
                        kind = str(getattr(exc, "kind", "store_error"))
                        delay = self._failed(uri, kind, str(getattr(exc, "reason", exc)), None)
                    except Exception as exc:  # a bug must not stop the coordinator: retried
                        delay = self._failed(uri, "internal", repr(exc), exc)
                    else:
                        self._arrived(uri, folder)
                        return
                    await trio.sleep(delay)
        finally:
            if self._scopes.get(uri) is scope:
                del self._scopes[uri]
            self._bump()

    def _failed(self, uri: str, kind: str, reason: str, exc: BaseException | None) -> float:
        """Count and log a failure; the wait before the next attempt."""
        assert self.fetcher is not None
        self.metrics.tokenizer_fetch_failures.labels(kind=kind).inc()
        failures, new = self.book.failed(uri, f"{kind}: {reason}")
        delay = self.fetcher.delay_s(failures)
        level = logging.WARNING if new else logging.DEBUG
        log.log(
            level,
            "tokenizer files of %s not fetched (%s: %s): its models route without prefix "
            "matching; attempt %d in %.1f s",
            uri,
            kind,
            reason,
            failures + 1,
            delay,
            exc_info=exc if new else None,
        )
        self._bump()
        return delay

    def _arrived(self, uri: str, folder: Path) -> None:
        self.book.arrived(uri, str(folder))
        self._assign()
        if uri in self._gauged:  # still wanted
            self.metrics.tokenizer_ready.labels(source=uri).set(1)
        names = sorted(n for n, p in self.prompt.model_paths.items() if p == str(folder))
        log.info(
            "tokenizer of %s ready at %s: prefix routing on for %s",
            uri,
            folder,
            ", ".join(names) or "no served name yet",
        )
        self._bump()


__all__ = ["FileFetcher", "TokenizerBook", "Tokenizers", "is_remote"]
