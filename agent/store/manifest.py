"""What a model folder holds: a :class:`Manifest` of files with sizes and checksums. Sans-I/O.

Every source is turned into a manifest before anything is downloaded. An ``http(s)://`` source
serves one as JSON (the format of :func:`parse_manifest`, documented in docs/MODELSTORE.md)::

    {"files": [{"path": "config.json", "size": 688, "sha256": "3f1c…"},
               {"path": "model.safetensors", "size": 2471645608, "sha256": "9ab0…"}]}

``path`` is relative, ``/``-separated, with no ``..``, ``.`` or empty parts; ``size`` is bytes;
``sha256`` is 64 lowercase hex digits and optional (then only the size is checked).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

MANIFEST_NAME = "fleet-manifest.json"
MODEL_MARKER = "config.json"

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX40 = re.compile(r"[0-9a-f]{40}")


def check_path(path: str) -> str | None:
    """Why ``path`` cannot name a file inside a model folder, or None when it can."""
    if not path or path.startswith("/") or "\\" in path or "\x00" in path:
        return "must be a relative /-separated path"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "must not contain empty, '.' or '..' parts"
    return None


@dataclass(frozen=True)
class FileEntry:
    """One file of a model folder.

    Attributes:
        path: relative, ``/``-separated (see :func:`check_path`).
        size: bytes.
        sha256: the content's SHA-256 (64 hex), or "" when the source gives none.
        git_sha1: the git blob id (40 hex) when no SHA-256 is known (small files on the
            Hugging Face Hub), or "".
        version: an opaque version of the file at the source (an S3 ETag, a Hub blob id), so a
            partial download resumes only onto the same bytes; "" when the source has none.
    """

    path: str
    size: int
    sha256: str = ""
    git_sha1: str = ""
    version: str = ""

    def __post_init__(self) -> None:
        why = check_path(self.path)
        if why is not None:
            raise ValueError(f"path {self.path!r} {why}")
        if self.size < 0:
            raise ValueError(f"{self.path}: size {self.size} must be >= 0")
        if self.sha256 and not _HEX64.fullmatch(self.sha256):
            raise ValueError(f"{self.path}: sha256 must be 64 lowercase hex digits")
        if self.git_sha1 and not _HEX40.fullmatch(self.git_sha1):
            raise ValueError(f"{self.path}: git_sha1 must be 40 lowercase hex digits")

    @property
    def verification(self) -> str:
        """How the file's content is checked: ``sha256``, ``git-sha1`` or ``size``."""
        return "sha256" if self.sha256 else "git-sha1" if self.git_sha1 else "size"


@dataclass(frozen=True)
class Manifest:
    """The files of one model folder, sorted by path, with unique paths."""

    files: tuple[FileEntry, ...]

    def __post_init__(self) -> None:
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError("file paths must be unique")
        prefixes = {p.rsplit("/", i)[0] for p in paths for i in range(1, p.count("/") + 1)}
        clash = prefixes & set(paths)
        if clash:
            raise ValueError(f"{sorted(clash)[0]!r} is both a file and a folder")
        object.__setattr__(self, "files", tuple(sorted(self.files, key=lambda f: f.path)))

    @property
    def total_bytes(self) -> int:
        """The sum of all file sizes."""
        return sum(f.size for f in self.files)

    def is_model(self) -> bool:
        """Whether the folder has a top-level ``config.json`` (what vLLM loads first)."""
        return any(f.path == MODEL_MARKER for f in self.files)

    def to_json(self) -> str:
        """The manifest in the format :func:`parse_manifest` reads."""
        files = []
        for f in self.files:
            item: dict[str, object] = {"path": f.path, "size": f.size}
            if f.sha256:
                item["sha256"] = f.sha256
            if f.git_sha1:
                item["git_sha1"] = f.git_sha1
            if f.version:
                item["version"] = f.version
            files.append(item)
        return json.dumps({"files": files}, indent=1, sort_keys=True)


def parse_manifest(data: bytes | str) -> Manifest:
    """Read a manifest (the JSON format of the module docstring).

    Args:
        data: the JSON document.

    Returns:
        The manifest.

    Raises:
        ValueError: not JSON, or a field with a bad value; the message names the field.
    """
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), list):
        raise ValueError('must be an object with a "files" list')
    files = []
    for i, item in enumerate(doc["files"]):
        if not isinstance(item, dict):
            raise ValueError(f"files[{i}] must be an object")
        path, size = item.get("path"), item.get("size")
        sha256, git_sha1 = item.get("sha256", ""), item.get("git_sha1", "")
        version = item.get("version", "")
        if not isinstance(path, str):
            raise ValueError(f"files[{i}].path must be a string")
        if not isinstance(size, int) or isinstance(size, bool):
            raise ValueError(f"files[{i}].size must be an integer")
        for key, value in (("sha256", sha256), ("git_sha1", git_sha1), ("version", version)):
            if not isinstance(value, str):
                raise ValueError(f"files[{i}].{key} must be a string")
        try:
            files.append(FileEntry(path, size, sha256.lower(), git_sha1.lower(), version))
        except ValueError as exc:
            raise ValueError(f"files[{i}]: {exc}") from exc
    return Manifest(tuple(files))


__all__ = ["MANIFEST_NAME", "MODEL_MARKER", "FileEntry", "Manifest", "check_path", "parse_manifest"]
