"""``hf://ORG/NAME[@REV]`` sources through ``huggingface_hub``.

huggingface_hub resolves the revision to a commit (``model_info``), lists the files
(``list_repo_tree``: an LFS file carries its SHA-256, any other its git blob id, so every file
is verified by content), builds each file's URL (``hf_hub_url``) and its headers (token,
user agent), and its own HTTP session downloads it. The store does not use
``snapshot_download``: that neither resumes after a crash nor verifies content (shared
TEST-SERVERS.md), and keeps a second copy in the hub's cache. Every blocking call runs in a
thread under the ``hf`` limiter. The endpoint is the store's ``hf_endpoint``, else
huggingface_hub's own (``HF_ENDPOINT``).

Importing this module sets ``HF_HUB_DISABLE_TELEMETRY=1`` unless the environment sets it: with
telemetry on, huggingface_hub 2.x builds its user agent by fetching
``{HF_ENDPOINT}/api/agent-harnesses``, the public hub even when the store uses a private mirror.
It must happen before huggingface_hub is imported (it reads the variable once).
"""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import trio

from .errors import SourceNotFound, SourceUnavailable
from .manifest import FileEntry, Manifest

T = TypeVar("T")

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


class HfSource:
    """A model repository on a Hugging Face Hub.

    Args:
        uri: ``hf://ORG/NAME[@REV]``.
        repo: ``ORG/NAME``.
        revision: a branch, tag or commit ("" = the default branch).
        endpoint: the Hub's base URL ("" = huggingface_hub's default).
        limiter: the huggingface_hub thread limiter.
        timeout_s: connect/read timeout of each request.
        chunk_bytes: read size.
    """

    def __init__(
        self,
        uri: str,
        *,
        repo: str,
        revision: str,
        endpoint: str,
        limiter: trio.CapacityLimiter,
        timeout_s: float,
        chunk_bytes: int,
    ) -> None:
        self.uri = uri
        self.repo = repo
        self.revision = revision
        self.endpoint = endpoint or None
        self.limiter = limiter
        self.timeout_s = timeout_s
        self.chunk_bytes = chunk_bytes
        self.commit = ""  # resolved by manifest()

    async def _call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        import httpx2  # huggingface_hub's HTTP client (its transport errors)
        from huggingface_hub import errors

        try:
            return await trio.to_thread.run_sync(
                functools.partial(fn, *args, **kwargs), limiter=self.limiter
            )
        except (
            errors.RepositoryNotFoundError,
            errors.RevisionNotFoundError,
            errors.EntryNotFoundError,
        ) as exc:
            raise SourceNotFound(self.uri, f"{type(exc).__name__}: {_first_line(exc)}") from exc
        except (errors.HfHubHTTPError, httpx2.HTTPError, OSError) as exc:
            raise SourceUnavailable(self.uri, f"{type(exc).__name__}: {_first_line(exc)}") from exc

    async def manifest(self) -> Manifest:
        """Resolve the revision and list its files (see :class:`~.sources.Source`)."""
        from huggingface_hub import HfApi, RepoFile

        api = HfApi(endpoint=self.endpoint)
        info = await self._call(
            api.model_info, self.repo, revision=self.revision or None, timeout=self.timeout_s
        )
        if not info.sha:
            raise SourceUnavailable(self.uri, "the Hub did not name the revision's commit")
        self.commit = info.sha
        tree = await self._call(
            lambda: list(api.list_repo_tree(self.repo, revision=self.commit, recursive=True))
        )
        files = []
        for item in tree:
            if not isinstance(item, RepoFile):
                continue  # a folder
            lfs = getattr(item, "lfs", None)
            sha256 = str(getattr(lfs, "sha256", "") or "") if lfs is not None else ""
            files.append(
                FileEntry(
                    path=item.path,
                    size=int(item.size),
                    sha256=sha256.lower(),
                    git_sha1="" if sha256 else str(item.blob_id).lower(),
                    version=f"{self.commit}:{item.blob_id}",
                )
            )
        return Manifest(tuple(files))

    async def chunks(self, entry: FileEntry, offset: int) -> AsyncGenerator[bytes, None]:
        """Download one file from ``offset`` (see :class:`~.sources.Source`)."""
        from huggingface_hub import get_session, hf_hub_url
        from huggingface_hub import utils as hub_utils

        url = hf_hub_url(self.repo, entry.path, revision=self.commit, endpoint=self.endpoint)
        headers: dict[str, str] = hub_utils.build_hf_headers()  # type: ignore[attr-defined]
        if offset:
            headers["Range"] = f"bytes={offset}-"
        stream: AbstractContextManager[Any] = get_session().stream(
            "GET", url, headers=headers, follow_redirects=True, timeout=self.timeout_s
        )
        response = await self._call(stream.__enter__)
        try:
            await self._call(hub_utils.hf_raise_for_status, response)  # type: ignore[attr-defined]
            status = response.status_code
            if offset and status != 206:
                raise SourceUnavailable(self.uri, f"GET {url}: HTTP {status} to a ranged GET")
            it: Iterator[bytes] = response.iter_bytes(self.chunk_bytes)
            while True:
                data = await self._call(next, it, b"")
                if not data:
                    return
                yield data
        finally:
            with trio.CancelScope(shield=True):
                await self._call(stream.__exit__, None, None, None)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


__all__ = ["HfSource"]
