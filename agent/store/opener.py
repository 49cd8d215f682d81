"""Open a remote :class:`~fleet.protocol.modelsource.ModelSource` as a :class:`~.sources.Source`.

One :class:`SourceOpener` per store (or per coordinator-side file fetcher) holds what sources
share: the S3 client (made once, in a thread, on the first ``s3://`` source), the thread limiters
of boto3 and huggingface_hub, and the settings of :class:`~.config.StoreConfig` that say where
the sources are (HF endpoint, S3 endpoint and region, HTTP timeout, chunk size).
"""

from __future__ import annotations

from typing import Any

import httpx
import trio

from fleet.protocol.modelsource import ModelSource

from .config import StoreConfig
from .hfsource import HfSource
from .httpsource import HttpSource
from .s3source import S3Source
from .sources import Source


class SourceOpener:
    """Turns ``http(s)://``, ``s3://`` and ``hf://`` sources into readable sources.

    Args:
        cfg: the endpoints, timeout, chunk size and thread counts.
    """

    def __init__(self, cfg: StoreConfig) -> None:
        self.cfg = cfg
        # One limiter per blocking library (shared/STYLE.md "Blocking calls").
        self.s3_limiter = trio.CapacityLimiter(cfg.s3_threads)
        self.hf_limiter = trio.CapacityLimiter(cfg.hf_threads)
        self._s3_client: Any = None

    async def open(self, src: ModelSource, http: httpx.AsyncClient) -> Source:
        """The source of a remote ``src``.

        Args:
            src: an ``http``, ``https``, ``s3`` or ``hf`` source.
            http: the client ``http(s)://`` sources use.

        Raises:
            ValueError: ``src`` is a local path or ``file://`` source.
        """
        cfg = self.cfg
        if src.scheme in ("http", "https"):
            return HttpSource(
                src.uri, http, timeout_s=cfg.http_timeout_s, chunk_bytes=cfg.chunk_bytes
            )
        if src.scheme == "s3":
            if self._s3_client is None:
                self._s3_client = await trio.to_thread.run_sync(
                    self._new_s3_client, limiter=self.s3_limiter
                )
            bucket, _, prefix = src.location.partition("/")
            return S3Source(
                src.uri,
                bucket=bucket,
                prefix=prefix,
                client=self._s3_client,
                limiter=self.s3_limiter,
                chunk_bytes=cfg.chunk_bytes,
            )
        if src.scheme == "hf":
            return HfSource(
                src.uri,
                repo=src.location,
                revision=src.revision,
                endpoint=cfg.hf_endpoint,
                limiter=self.hf_limiter,
                timeout_s=cfg.http_timeout_s,
                chunk_bytes=cfg.chunk_bytes,
            )
        raise ValueError(f"{src.uri}: a {src.scheme} source is local, not fetched")

    def _new_s3_client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.cfg.s3_endpoint_url or None,
            region_name=self.cfg.s3_region,
            config=Config(s3={"addressing_style": "path"}) if self.cfg.s3_endpoint_url else None,
        )


__all__ = ["SourceOpener"]
