"""``s3://BUCKET/PREFIX`` sources through boto3 (any S3 API: AWS, MinIO, moto).

The objects under ``PREFIX/`` are the model's files. A file's SHA-256 comes from the object's
full-object checksum (uploaded with ``ChecksumAlgorithm="SHA256"``, read with
``ChecksumMode="ENABLED"``); a multipart object's checksum is a checksum of part checksums, so
such files, and files uploaded without one, are checked by size only. The ETag is never taken
for an MD5 (multipart ETags are not). A read is a GET with ``IfMatch`` the listed ETag (a file
replaced meanwhile fails instead of mixing versions) and, to resume, ``Range: bytes=N-``.
Every boto3 call runs in a thread under the ``s3`` limiter.
"""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import AsyncGenerator, Callable
from typing import Any, TypeVar

import trio

from .errors import SourceNotFound, SourceUnavailable
from .manifest import FileEntry, Manifest, check_path

T = TypeVar("T")

_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}


class S3Source:
    """A model folder in an S3 bucket.

    Args:
        uri: ``s3://BUCKET[/PREFIX]``.
        bucket: the bucket.
        prefix: the folder inside it ("" = the whole bucket).
        client: a boto3 S3 client.
        limiter: the boto3 thread limiter.
        chunk_bytes: read size.
    """

    def __init__(
        self,
        uri: str,
        *,
        bucket: str,
        prefix: str,
        client: Any,
        limiter: trio.CapacityLimiter,
        chunk_bytes: int,
    ) -> None:
        self.uri = uri
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.client = client
        self.limiter = limiter
        self.chunk_bytes = chunk_bytes

    async def _call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        import botocore.exceptions

        try:
            return await trio.to_thread.run_sync(
                functools.partial(fn, *args, **kwargs), limiter=self.limiter
            )
        except botocore.exceptions.ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            what = f"{code or 'error'}: {error.get('Message', '')}".rstrip(": ")
            if code in _NOT_FOUND:
                raise SourceNotFound(self.uri, what) from exc
            raise SourceUnavailable(self.uri, what) from exc
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise SourceUnavailable(self.uri, repr(exc)) from exc

    async def manifest(self) -> Manifest:
        """List ``PREFIX/`` with sizes and checksums (see :class:`~.sources.Source`)."""
        objects: list[dict[str, Any]] = []
        token: dict[str, str] = {}
        while True:
            page = await self._call(
                self.client.list_objects_v2, Bucket=self.bucket, Prefix=self.prefix, **token
            )
            objects.extend(page.get("Contents", []))
            if not page.get("IsTruncated"):
                break
            token = {"ContinuationToken": page["NextContinuationToken"]}
        files = []
        for obj in objects:
            path = obj["Key"][len(self.prefix) :]
            if not path or path.endswith("/"):
                continue  # a "folder" marker object
            if check_path(path) is not None:
                continue  # a key no file system path can hold ("a//b"): not a model file
            head = await self._call(
                self.client.head_object, Bucket=self.bucket, Key=obj["Key"], ChecksumMode="ENABLED"
            )
            etag = str(head.get("ETag", "")).strip('"')
            files.append(
                FileEntry(
                    path=path,
                    size=int(head["ContentLength"]),
                    sha256=_full_object_sha256(head, etag),
                    version=etag,
                )
            )
        if not files:
            raise SourceNotFound(self.uri, f"no objects under s3://{self.bucket}/{self.prefix}")
        return Manifest(tuple(files))

    async def chunks(self, entry: FileEntry, offset: int) -> AsyncGenerator[bytes, None]:
        """Read one object from ``offset`` (see :class:`~.sources.Source`)."""
        extra: dict[str, str] = {}
        if offset:
            extra["Range"] = f"bytes={offset}-"
        if entry.version:
            extra["IfMatch"] = f'"{entry.version}"'
        response = await self._call(
            self.client.get_object, Bucket=self.bucket, Key=self.prefix + entry.path, **extra
        )
        body = response["Body"]
        try:
            while True:
                data = await self._call(body.read, self.chunk_bytes)
                if not data:
                    return
                yield data
        finally:
            body.close()  # closes the socket; does not block on the rest of the body


def _full_object_sha256(head: dict[str, Any], etag: str) -> str:
    """The object's SHA-256 in hex when S3 holds one of the whole object, else ""."""
    value = head.get("ChecksumSHA256")
    if not isinstance(value, str) or "-" in value or "-" in etag:
        return ""  # none, or composite (a checksum of part checksums; moto drops the -N)
    if head.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
        return ""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return ""
    return raw.hex() if len(raw) == 32 else ""


__all__ = ["S3Source"]
