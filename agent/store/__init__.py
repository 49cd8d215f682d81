"""The model store of an agent: source URIs in, verified local model folders out.

Layers (each module one job; the cores are sans-I/O)::

    store.py        ModelStore: the service (shared downloads, budget, pins, progress)
    subset.py       SubsetFetcher: chosen files only (the coordinator's tokenizers)
    download.py     one manifest into a partial folder: resume, verify
    opener.py       a source URI → the Source below (endpoints, S3 client, limiters)
    cachedir.py     the folder layout on disk and its atomic steps
    httpsource.py   http(s):// manifests           ┐
    s3source.py     s3:// through boto3            ├ sources.py: the Source protocol
    hfsource.py     hf:// through huggingface_hub  ┘
    manifest.py     Manifest, FileEntry, the JSON manifest format        (sans-I/O)
    lru.py          which models to evict                               (sans-I/O)
    retry.py        when to try a failed fetch again                    (sans-I/O)
    progress.py     bytes, rate, ETA of a fetch                         (sans-I/O)
    errors.py       StoreError and its subclasses
    config.py       StoreConfig

docs/MODELSTORE.md describes the sources, the manifest format, the cache layout and what the
store guarantees.
"""

from .config import StoreConfig
from .errors import (
    ChecksumMismatch,
    NoSpace,
    NotAModel,
    SourceNotFound,
    SourceUnavailable,
    StoreError,
)
from .manifest import MANIFEST_NAME, FileEntry, Manifest, parse_manifest
from .progress import FetchProgress
from .retry import RetryPolicy
from .store import CachedModel, ModelStore
from .subset import SubsetFetcher

__all__ = [
    "MANIFEST_NAME",
    "CachedModel",
    "ChecksumMismatch",
    "FetchProgress",
    "FileEntry",
    "Manifest",
    "ModelStore",
    "NoSpace",
    "NotAModel",
    "RetryPolicy",
    "SourceNotFound",
    "SourceUnavailable",
    "StoreError",
    "StoreConfig",
    "SubsetFetcher",
    "parse_manifest",
]
