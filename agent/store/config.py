"""Configuration of the model store: one frozen dataclass, units in the names."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fleet.protocol.errors import ConfigError

from .retry import RetryPolicy

GiB = 1024**3
MiB = 1024**2


@dataclass(frozen=True)
class StoreConfig:
    """Where and how an agent keeps models.

    Attributes:
        root: the cache folder (``entries/``, ``partial/``, ``trash/`` below it).
        budget_bytes: the most the cache may hold, entries and partial downloads together;
            0 = no budget (only the disk's free space, less ``min_free_bytes``, limits it).
        min_free_bytes: free disk space a download must leave.
        chunk_bytes: the unit of reading from a source and writing to disk.
        http_timeout_s: connect/read timeout of one HTTP request (http(s) and hf sources).
        s3_endpoint_url: the S3 API endpoint ("" = AWS's, from boto3's own configuration).
        s3_region: the S3 region name.
        hf_endpoint: the Hugging Face Hub endpoint ("" = huggingface_hub's, i.e. HF_ENDPOINT
            or the public hub).
        s3_threads: threads boto3 may use at once (its CapacityLimiter).
        hf_threads: threads huggingface_hub may use at once.
        disk_threads: threads for file writes, hashing and deletes.
        progress_window_s: how far back the download rate looks.
        retry: the backoff of failed fetches.
    """

    root: Path = Path(".fleet/models")
    budget_bytes: int = 0
    min_free_bytes: int = 1 * GiB
    chunk_bytes: int = 4 * MiB
    http_timeout_s: float = 30.0
    s3_endpoint_url: str = ""
    s3_region: str = "us-east-1"
    hf_endpoint: str = ""
    s3_threads: int = 8
    hf_threads: int = 8
    disk_threads: int = 4
    progress_window_s: float = 10.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        for key in ("budget_bytes", "min_free_bytes"):
            if getattr(self, key) < 0:
                raise ConfigError(key, getattr(self, key), "must be >= 0")
        if self.chunk_bytes < 1024:
            raise ConfigError("chunk_bytes", self.chunk_bytes, "must be >= 1024")
        for key in ("http_timeout_s", "progress_window_s"):
            if not getattr(self, key) > 0:
                raise ConfigError(key, getattr(self, key), "must be > 0")
        for key in ("s3_threads", "hf_threads", "disk_threads"):
            if getattr(self, key) < 1:
                raise ConfigError(key, getattr(self, key), "must be >= 1")
        for key in ("s3_endpoint_url", "hf_endpoint"):
            value = getattr(self, key)
            if value and not value.startswith(("http://", "https://")):
                raise ConfigError(key, value, "must be an http(s):// URL or empty")


__all__ = ["GiB", "MiB", "StoreConfig"]
