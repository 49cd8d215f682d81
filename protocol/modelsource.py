"""Where a model comes from: a source URI (a deployment's ``spec.source``, an engine's
``model_path``) parsed into a :class:`ModelSource`.

Accepted (the model store of each agent fetches them):

=================================  =========  ============================================
``spec.source``                    scheme     location / revision
=================================  =========  ============================================
``/models/chat`` or ``models/x``   ``path``   the path as written (no ``://``)
``file:///models/chat``            ``file``   ``/models/chat`` (absolute; host empty or
                                              ``localhost``)
``https://host/models/chat/``      ``https``  the URL (a folder listing or a manifest)
``s3://bucket/prefix``             ``s3``     ``bucket/prefix``
``hf://org/name`` / ``@rev``       ``hf``     ``org/name``; revision ``rev`` (``""`` = main)
=================================  =========  ============================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

SourceScheme = Literal["path", "file", "http", "https", "s3", "hf"]

_HF = re.compile(
    r"hf://(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)"
    r"(?:@(?P<rev>[A-Za-z0-9][A-Za-z0-9_./-]*))?"
)
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_KINDS = "a path, file://, http(s)://, s3://BUCKET[/PREFIX] or hf://ORG/NAME[@REV]"


@dataclass(frozen=True)
class ModelSource:
    """A parsed ``spec.source``.

    Attributes:
        uri: the text as written (what a deployment writes back).
        scheme: which kind of source.
        location: the path, URL, ``bucket/prefix`` or ``org/name`` (see the module table).
        revision: the Hugging Face revision (``hf`` only; ``""`` = the default branch).
    """

    uri: str
    scheme: SourceScheme
    location: str
    revision: str = ""

    @classmethod
    def parse(cls, uri: str) -> ModelSource:
        """Parse a source URI.

        Args:
            uri: ``spec.source``.

        Returns:
            The source.

        Raises:
            ValueError: not one of the accepted forms; the message says what is expected.
        """
        if not uri or uri != uri.strip():
            raise ValueError(f"must be {_KINDS} (no surrounding spaces)")
        if "://" not in uri:
            return cls(uri=uri, scheme="path", location=uri)
        scheme = uri.split("://", 1)[0].lower()
        if scheme == "hf":
            match = _HF.fullmatch(uri)
            if match is None:
                raise ValueError("must be hf://ORG/NAME or hf://ORG/NAME@REVISION")
            return cls(uri=uri, scheme="hf", location=match["repo"], revision=match["rev"] or "")
        parts = urlsplit(uri)
        if scheme == "file":
            path = unquote(parts.path)
            if parts.netloc not in ("", "localhost") or not path.startswith("/"):
                raise ValueError("must be file:///ABSOLUTE/PATH")
            return cls(uri=uri, scheme="file", location=path)
        if scheme in ("http", "https"):
            if not parts.hostname:
                raise ValueError(f"must be {scheme}://HOST/PATH")
            return cls(uri=uri, scheme="https" if scheme == "https" else "http", location=uri)
        if scheme == "s3":
            if not _BUCKET.fullmatch(parts.netloc):
                raise ValueError("must be s3://BUCKET[/PREFIX] with a valid bucket name")
            prefix = parts.path.strip("/")
            return cls(
                uri=uri,
                scheme="s3",
                location=f"{parts.netloc}/{prefix}" if prefix else parts.netloc,
            )
        raise ValueError(f"scheme {scheme!r} is not supported; use {_KINDS}")


__all__ = ["ModelSource", "SourceScheme"]
