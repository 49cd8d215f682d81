"""What every remote model source offers the store: a manifest, and a file's bytes from an offset.

A source raises only :class:`~fleet.agent.store.errors.StoreError` subclasses: each
translates its library's errors at this boundary (``from exc``). Sources that wrap a blocking
library (boto3, huggingface_hub) run every call through ``trio.to_thread.run_sync`` with that
library's :class:`trio.CapacityLimiter`, one chunk per call, so a cancel takes effect between
chunks.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

from .manifest import FileEntry, Manifest


class Source(Protocol):
    """A remote model folder.

    Attributes:
        uri: the source URI, for messages.
    """

    uri: str

    async def manifest(self) -> Manifest:
        """List the folder's files with sizes and whatever checksums the source has.

        Raises:
            SourceNotFound: no such model.
            SourceUnavailable: the source cannot be read now.
            NotAModel: the listing is malformed.
        """
        ...

    def chunks(self, entry: FileEntry, offset: int) -> AsyncGenerator[bytes, None]:
        """The bytes of ``entry`` from ``offset`` on (a ranged request when ``offset`` > 0).

        Use it under ``contextlib.aclosing``.

        Raises:
            SourceNotFound: the file is gone.
            SourceUnavailable: the transfer failed or the file changed at the source.
        """
        ...


__all__ = ["Source"]
