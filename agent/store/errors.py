"""Errors of the model store, each with the source URI and a reason string for a status line.

::

    FleetError (fleet.protocol.errors)
    └── StoreError            a model could not be made available; ``uri`` and ``reason``
        ├── SourceNotFound    the source answered "no such model/file" (HTTP 404, NoSuchKey,
        │                     RepositoryNotFound, a missing local folder)
        ├── SourceUnavailable the source could not be read right now (connection cut, 5xx,
        │                     timeout); a partial download is kept and resumes next time
        ├── ChecksumMismatch  a file's bytes do not match the manifest's SHA-256 (or git SHA-1,
        │                     or size); the partial download is deleted
        ├── NotAModel         the source is not a model folder (no ``config.json``), or its
        │                     listing is malformed
        └── NoSpace           the store's disk budget or the disk itself cannot hold the model,
                              even after evicting every unpinned model

Every error leaves no half-written cache entry: only a complete, verified download is ever
renamed into the cache.
"""

from __future__ import annotations

from fleet.protocol.errors import FleetError


class StoreError(FleetError):
    """Raised when a model cannot be made available on this node.

    Args:
        uri: the model's source URI.
        reason: what went wrong, for an engine's status line.
    """

    kind = "store_error"

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(f"{uri}: {reason}")
        self.uri = uri
        self.reason = reason

    def again(self) -> StoreError:
        """A fresh copy, so each task waiting on one shared download raises its own object."""
        return type(self)(self.uri, self.reason)


class SourceNotFound(StoreError):
    """Raised when the source says the model, revision or one of its files does not exist."""

    kind = "not_found"


class SourceUnavailable(StoreError):
    """Raised when the source cannot be read now (network, server error, a cut transfer)."""

    kind = "unavailable"


class ChecksumMismatch(StoreError):
    """Raised when a downloaded file's content does not match what the source declared."""

    kind = "checksum_mismatch"


class NotAModel(StoreError):
    """Raised when the source is not a model folder (no ``config.json``) or lists bad paths."""

    kind = "not_a_model"


class NoSpace(StoreError):
    """Raised when the disk budget or the free disk space cannot hold the model."""

    kind = "no_space"


__all__ = [
    "ChecksumMismatch",
    "NoSpace",
    "NotAModel",
    "SourceNotFound",
    "SourceUnavailable",
    "StoreError",
]
