"""``http(s)://`` sources: a folder URL serving ``fleet-manifest.json``, or a manifest URL.

``https://host/models/chat/`` reads ``https://host/models/chat/fleet-manifest.json``;
``https://host/models/chat/v2.json`` (a URL ending in ``.json``) is the manifest itself. Either
way the files are fetched relative to the manifest's folder: ``https://host/models/chat/PATH``.
A resume sends ``Range: bytes=N-``; a server that ignores it (200) has its first N bytes skipped.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from urllib.parse import quote

import httpx

from .errors import NotAModel, SourceNotFound, SourceUnavailable
from .manifest import MANIFEST_NAME, FileEntry, Manifest, parse_manifest


class HttpSource:
    """A model folder behind HTTP.

    Args:
        uri: the folder or manifest URL.
        client: the agent's HTTP client.
        timeout_s: connect/read timeout of each request.
        chunk_bytes: read size.
    """

    def __init__(
        self, uri: str, client: httpx.AsyncClient, *, timeout_s: float, chunk_bytes: int
    ) -> None:
        self.uri = uri
        self.client = client
        self.timeout = httpx.Timeout(timeout_s)
        self.chunk_bytes = chunk_bytes
        if uri.split("?", 1)[0].endswith(".json"):
            self.manifest_url = uri
            self.base = uri.rsplit("/", 1)[0] + "/"
        else:
            self.base = uri.rstrip("/") + "/"
            self.manifest_url = self.base + MANIFEST_NAME

    async def manifest(self) -> Manifest:
        """Fetch and parse the manifest (see :class:`~fleet.agent.store.sources.Source`)."""
        try:
            response = await self.client.get(self.manifest_url, timeout=self.timeout)
        except httpx.HTTPError as exc:
            raise SourceUnavailable(self.uri, f"GET {self.manifest_url}: {exc!r}") from exc
        if response.status_code == 404:
            raise SourceNotFound(self.uri, f"GET {self.manifest_url}: 404 Not Found")
        if response.status_code != 200:
            raise SourceUnavailable(
                self.uri, f"GET {self.manifest_url}: HTTP {response.status_code}"
            )
        try:
            return parse_manifest(response.content)
        except ValueError as exc:
            raise NotAModel(self.uri, f"bad manifest {self.manifest_url}: {exc}") from exc

    async def chunks(self, entry: FileEntry, offset: int) -> AsyncGenerator[bytes, None]:
        """Stream one file from ``offset`` (see :class:`~fleet.agent.store.sources.Source`).

        Bytes are gathered into ``chunk_bytes`` pieces; when a transfer breaks, what arrived
        is still yielded before the error, so a resume asks for exactly the rest.
        """
        url = self.base + quote(entry.path)
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        buf = bytearray()
        failure: SourceUnavailable | None = None
        try:
            async with self.client.stream(
                "GET", url, headers=headers, timeout=self.timeout
            ) as response:
                status = response.status_code
                if status == 404:
                    raise SourceNotFound(self.uri, f"GET {url}: 404 Not Found")
                if status not in (200, 206) or (status == 206 and not offset):
                    raise SourceUnavailable(self.uri, f"GET {url}: HTTP {status}")
                skip = offset if status == 200 else 0  # the server ignored the Range
                async for data in response.aiter_bytes():
                    if skip:
                        cut = min(skip, len(data))
                        data, skip = data[cut:], skip - cut
                    buf += data
                    if len(buf) >= self.chunk_bytes:
                        yield bytes(buf)
                        buf.clear()
        except httpx.HTTPError as exc:
            failure = SourceUnavailable(self.uri, f"GET {url}: {exc!r}")
            failure.__cause__ = exc
        if buf:
            yield bytes(buf)
        if failure is not None:
            raise failure


__all__ = ["HttpSource"]
