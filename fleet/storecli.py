"""The model store's flags, shared by ``fleet agent`` and ``fleet up``, and the source and
tokenizer-cache flags of ``fleet coordinator`` (docs/MODELSTORE.md)."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

_UNITS = {"": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4,
          "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # fmt: skip
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]i?B)?$")


def add_store_args(p: argparse.ArgumentParser) -> None:
    """``--model-cache``, ``--model-cache-budget`` and :func:`add_source_args`'s flags."""
    p.add_argument(
        "--model-cache",
        type=Path,
        default=Path(".fleet/model-cache"),
        metavar="DIR",
        help="where the agent keeps models fetched from hf://, s3:// and http(s):// sources "
        "(default %(default)s)",
    )
    p.add_argument(
        "--model-cache-budget",
        default="0",
        metavar="SIZE",
        help="most the cache may hold, e.g. 200GiB; least recently used models no engine uses "
        "are evicted (default 0: only the disk's free space limits it)",
    )
    add_source_args(p)


def add_source_args(p: argparse.ArgumentParser) -> None:
    """``--s3-endpoint-url``, ``--hf-endpoint``: where remote sources are read (by the agent's
    store, and by the coordinator for their tokenizer files)."""
    p.add_argument(
        "--s3-endpoint-url",
        default=os.environ.get("AWS_ENDPOINT_URL_S3", os.environ.get("AWS_ENDPOINT_URL", "")),
        help="S3 API endpoint for s3:// sources (default $AWS_ENDPOINT_URL_S3, "
        "$AWS_ENDPOINT_URL, or AWS)",
    )
    p.add_argument(
        "--hf-endpoint",
        default=os.environ.get("HF_ENDPOINT", ""),
        help="Hugging Face Hub endpoint for hf:// sources (default $HF_ENDPOINT or the hub)",
    )


def add_tokenizer_args(p: argparse.ArgumentParser) -> None:
    """``--tokenizer-cache``: where the coordinator keeps remote sources' tokenizer files."""
    p.add_argument(
        "--tokenizer-cache",
        type=Path,
        default=Path(".fleet/tokenizers"),
        metavar="DIR",
        help="where the coordinator keeps the tokenizer files (never the weights) it fetches "
        "of hf://, s3:// and http(s):// sources, to route by prefix (default %(default)s)",
    )


def parse_size(text: str, flag: str = "--model-cache-budget") -> int:
    """``200GiB`` -> bytes (KiB..TiB, KB..TB, or a plain number of bytes).

    Raises:
        ConfigError: not a size.
    """
    from fleet.protocol.errors import ConfigError

    match = _SIZE.match(text.strip())
    if match is None:
        raise ConfigError(flag, text, "must be a size such as 200GiB or 500GB")
    return int(float(match[1]) * _UNITS[match[2] or ""])


def store_config(args: argparse.Namespace) -> Any:
    """The agent's StoreConfig from the flags.

    Raises:
        ConfigError: a bad value (names the flag).
    """
    from fleet.agent.store import StoreConfig

    return StoreConfig(
        root=args.model_cache,
        budget_bytes=parse_size(args.model_cache_budget),
        s3_endpoint_url=args.s3_endpoint_url,
        hf_endpoint=args.hf_endpoint,
    )


def tokenizer_files(args: argparse.Namespace) -> Any:
    """The coordinator's fetcher of tokenizer files (a ``SubsetFetcher``) from the flags.

    Raises:
        ConfigError: a bad value.
    """
    from fleet.agent.store import StoreConfig, SubsetFetcher
    from fleet.protocol.vllm_tokenizer import TOKENIZER_FILES

    cfg = StoreConfig(
        root=args.tokenizer_cache,
        s3_endpoint_url=args.s3_endpoint_url,
        hf_endpoint=args.hf_endpoint,
    )
    return SubsetFetcher(cfg, TOKENIZER_FILES)


__all__ = [
    "add_source_args",
    "add_store_args",
    "add_tokenizer_args",
    "parse_size",
    "store_config",
    "tokenizer_files",
]
