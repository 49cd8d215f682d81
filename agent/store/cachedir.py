"""The store's folder on disk. Blocking file operations: call them through a thread.

Layout under ``root``::

    entries/KEY/entry.json     what the entry is (uri, size, last use) — written before commit
    entries/KEY/manifest.json  the files and checksums the download was verified against
    entries/KEY/model/…        the model folder handed to vLLM
    partial/KEY/manifest.json  the manifest a download started from (resume only onto it)
    partial/KEY/model/…        files already complete and verified
    partial/KEY/parts/…        files being written; their length is where a resume starts
    trash/KEY.N                entries and partials being deleted

A download becomes an entry by one ``rename(partial/KEY, entries/KEY)``, after every file was
verified, so ``entries/`` only ever holds complete models. Deletes rename into ``trash/`` first,
so a half-deleted model is never found under ``entries/`` either.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from .manifest import Manifest, parse_manifest

_SLUG = re.compile(r"[^A-Za-z0-9._-]+")


def cache_key(uri: str) -> str:
    """A folder name for ``uri``: readable, and unique through a hash of the whole URI."""
    slug = _SLUG.sub("-", uri.split("://", 1)[-1]).strip("-.")[:60] or "model"
    return f"{slug}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class EntryMeta:
    """What ``entries/KEY/entry.json`` holds.

    Attributes:
        key: the cache key.
        uri: the source URI.
        size_bytes: the model's size.
        last_used: when it was last fetched or released by an engine (epoch seconds).
        verification: how its files were checked (``sha256``, ``git-sha1``, ``size`` counts).
    """

    key: str
    uri: str
    size_bytes: int
    last_used: float
    verification: str = ""


class CacheDir:
    """The folder layout of the module docstring.

    Args:
        root: the cache folder (created when missing).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.entries = root / "entries"
        self.partial = root / "partial"
        self.trash = root / "trash"
        self._trash_seq = itertools.count()

    def model_dir(self, key: str) -> Path:
        """The model folder of a complete entry."""
        return self.entries / key / "model"

    def partial_dir(self, key: str) -> Path:
        """The download folder of ``key``."""
        return self.partial / key

    def prepare(self) -> tuple[list[EntryMeta], dict[str, int]]:
        """Create the layout, empty the trash, and read what is there.

        Returns:
            The complete entries, and the size of each leftover partial download.
        """
        for d in (self.entries, self.partial, self.trash):
            d.mkdir(parents=True, exist_ok=True)
        for leftover in self.trash.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        entries = []
        for d in sorted(self.entries.iterdir()):
            try:
                doc = json.loads((d / "entry.json").read_text())
                entries.append(EntryMeta(**doc))
            except (OSError, ValueError, TypeError):
                self._discard(d)  # not something this store committed
        partials = {d.name: tree_bytes(d) for d in sorted(self.partial.iterdir())}
        return entries, partials

    def saved_manifest(self, key: str) -> Manifest | None:
        """The manifest a partial download of ``key`` started from, if any."""
        try:
            return parse_manifest((self.partial_dir(key) / "manifest.json").read_bytes())
        except (OSError, ValueError):
            return None

    def start_partial(self, key: str, manifest: Manifest) -> None:
        """Begin (or keep) the partial download of ``key`` against ``manifest``.

        A leftover partial download made from another manifest is discarded first.
        """
        pdir = self.partial_dir(key)
        if pdir.exists() and self.saved_manifest(key) != manifest:
            self._discard(pdir)
        (pdir / "model").mkdir(parents=True, exist_ok=True)
        (pdir / "parts").mkdir(parents=True, exist_ok=True)
        _write_atomic(pdir / "manifest.json", manifest.to_json())

    def commit(self, meta: EntryMeta) -> Path:
        """Turn the complete partial download of ``meta.key`` into an entry; its model folder."""
        pdir = self.partial_dir(meta.key)
        shutil.rmtree(pdir / "parts", ignore_errors=True)
        _write_atomic(pdir / "entry.json", json.dumps(asdict(meta)))
        target = self.entries / meta.key
        if target.exists():
            self._discard(target)
        os.rename(pdir, target)
        return self.model_dir(meta.key)

    def touch(self, meta: EntryMeta) -> None:
        """Rewrite an entry's ``entry.json`` (its last use changed)."""
        _write_atomic(self.entries / meta.key / "entry.json", json.dumps(asdict(meta)))

    def remove_entry(self, key: str) -> None:
        """Delete an entry (first out of ``entries/``, then from disk)."""
        self._discard(self.entries / key)

    def remove_partial(self, key: str) -> None:
        """Delete a partial download."""
        self._discard(self.partial_dir(key))

    def _discard(self, path: Path) -> None:
        if not path.exists():
            return
        target = self.trash / f"{path.name}.{os.getpid()}.{next(self._trash_seq)}"
        os.rename(path, target)
        shutil.rmtree(target, ignore_errors=True)


def tree_bytes(path: Path) -> int:
    """The bytes of every file below ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


__all__ = ["CacheDir", "EntryMeta", "cache_key", "tree_bytes"]
