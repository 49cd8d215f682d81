"""Download a manifest's files into a partial folder: resume, verify, never leave a bad file.

For each file: a file already under ``model/`` was verified before it was moved there and is
kept; otherwise the bytes already under ``parts/`` are hashed again and the source is asked for
the rest only (a ranged read from their length). Once all bytes are in, the content is checked
(SHA-256, else git blob SHA-1, else the size) and the file moves to ``model/``.

A cut transfer raises :class:`SourceUnavailable` and keeps ``parts/`` for the next attempt; a
file that does not match raises :class:`ChecksumMismatch` (the caller discards the partial
folder); a full disk raises :class:`NoSpace`. Writes and hashing run in threads under the
disk limiter.
"""

from __future__ import annotations

import errno
import hashlib
import os
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import trio

from .errors import ChecksumMismatch, NoSpace, SourceUnavailable, StoreError
from .manifest import FileEntry, Manifest
from .progress import ProgressMeter
from .sources import Source


@dataclass
class _Digest:
    """The running checksum of one file."""

    entry: FileEntry
    sha256: Any = field(default_factory=hashlib.sha256)
    sha1: Any = field(default_factory=hashlib.sha1)
    size: int = 0

    def __post_init__(self) -> None:
        self.sha1.update(b"blob %d\0" % self.entry.size)  # git's blob header

    def update(self, data: bytes) -> None:
        self.size += len(data)
        if self.entry.sha256:
            self.sha256.update(data)
        elif self.entry.git_sha1:
            self.sha1.update(data)

    def mismatch(self) -> str | None:
        """Why the bytes are not the declared file, or None when they are."""
        e = self.entry
        if self.size != e.size:
            return f"{e.path}: {self.size} bytes, expected {e.size}"
        if e.sha256 and self.sha256.hexdigest() != e.sha256:
            return f"{e.path}: sha256 {self.sha256.hexdigest()}, expected {e.sha256}"
        if not e.sha256 and e.git_sha1 and self.sha1.hexdigest() != e.git_sha1:
            return f"{e.path}: git blob {self.sha1.hexdigest()}, expected {e.git_sha1}"
        return None


async def download(
    source: Source,
    manifest: Manifest,
    pdir: Path,
    meter: ProgressMeter,
    *,
    disk: trio.CapacityLimiter,
) -> None:
    """Bring every file of ``manifest`` into ``pdir/model/``, verified.

    Args:
        source: where the files come from.
        manifest: what to download.
        pdir: the partial folder (``model/`` and ``parts/`` exist).
        meter: counts bytes and files.
        disk: the thread limiter of file I/O.

    Raises:
        SourceNotFound: a file is gone at the source.
        SourceUnavailable: a transfer failed; what arrived is kept for a resume.
        ChecksumMismatch: a file's content is wrong.
        NoSpace: the disk filled up.
    """
    for entry in manifest.files:
        final = pdir / "model" / entry.path
        if await trio.to_thread.run_sync(_size_or_none, final, limiter=disk) == entry.size:
            meter.resumed(entry.size)
            meter.file_done()
            continue
        part = pdir / "parts" / entry.path
        digest = await trio.to_thread.run_sync(_rehash, part, entry, limiter=disk)
        meter.resumed(digest.size)
        if digest.size < entry.size:
            await _transfer(source, entry, part, digest, meter, disk)
        why = digest.mismatch()
        if why is not None:
            if digest.size < entry.size:
                raise SourceUnavailable(source.uri, f"transfer ended early: {why}")
            raise ChecksumMismatch(source.uri, why)
        await trio.to_thread.run_sync(_move, part, final, limiter=disk)
        meter.file_done()


async def _transfer(
    source: Source,
    entry: FileEntry,
    part: Path,
    digest: _Digest,
    meter: ProgressMeter,
    disk: trio.CapacityLimiter,
) -> None:
    f: IO[bytes] = await trio.to_thread.run_sync(_open_append, part, limiter=disk)
    try:
        async with aclosing(source.chunks(entry, digest.size)) as chunks:
            async for data in chunks:
                if digest.size + len(data) > entry.size:
                    raise ChecksumMismatch(
                        source.uri, f"{entry.path}: more than the declared {entry.size} bytes"
                    )
                await trio.to_thread.run_sync(_write, f, data, source.uri, limiter=disk)
                digest.update(data)
                meter.add(len(data), trio.current_time())
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(f.close, limiter=disk)


def _size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def _rehash(part: Path, entry: FileEntry) -> _Digest:
    """The checksum state of what an earlier attempt wrote to ``part`` (empty if nothing)."""
    digest = _Digest(entry)
    try:
        with open(part, "rb") as f:
            while data := f.read(1 << 20):
                if digest.size + len(data) > entry.size:
                    break
                digest.update(data)
    except FileNotFoundError:
        return digest
    if digest.size != os.stat(part).st_size:  # longer than the file can be: start over
        os.truncate(part, 0)
        return _Digest(entry)
    return digest


def _open_append(part: Path) -> IO[bytes]:
    part.parent.mkdir(parents=True, exist_ok=True)
    return open(part, "ab")  # noqa: SIM115 - closed by the caller


def _write(f: IO[bytes], data: bytes, uri: str) -> None:
    try:
        f.write(data)
        f.flush()
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NoSpace(uri, f"disk full writing {f.name}: {exc.strerror}") from exc
        raise StoreError(uri, f"cannot write {f.name}: {exc.strerror}") from exc


def _move(part: Path, final: Path) -> None:
    """Move a verified file into place, its bytes on disk first (a commit survives a crash)."""
    with open(part, "rb") as f:
        os.fsync(f.fileno())
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, final)


__all__ = ["download"]
