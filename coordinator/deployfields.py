"""Checked reads of a decoded YAML/JSON document that collect every problem instead of stopping.

The deployment parser (:mod:`fleet.coordinator.deployspec`) reads each field through
:class:`Fields`. A bad value is recorded as ``(field path, reason)`` and a neutral value returned,
so one pass finds every problem of a document. Reasons follow one shape: what the value must be,
then ``got VALUE`` (``must be an integer >= 1, got 0``).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import Any


def is_int(value: object) -> bool:
    """True for an int that is not a bool (YAML's ``true`` is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class Fields:
    """Collects problems while reading one document.

    Args:
        deployment: the deployment's name, for the error (``"?"`` when it has none).
    """

    def __init__(self, deployment: str) -> None:
        self.deployment = deployment
        self.problems: list[tuple[str, str]] = []

    def bad(self, path: str, reason: str) -> None:
        """Record a problem at ``path``."""
        self.problems.append((path, reason))

    def mapping(
        self,
        value: object,
        path: str,
        known: tuple[str, ...],
        *,
        required: tuple[str, ...] = (),
        moved: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Check a map: no unknown keys, every required key present.

        Args:
            moved: unknown keys that belong elsewhere -> where (``labels`` -> ``metadata.labels``).

        Returns:
            The map (``{}`` when it is not one).
        """
        if not isinstance(value, dict):
            self.bad(path or "(document)", f"must be a map, got {value!r}")
            return {}
        for key in value:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(known)}"
                if moved and key in moved:
                    hint = f"it belongs in {moved[key]}"
                self.bad(_join(path, str(key)), f"unknown field ({hint})")
        for key in required:
            if key not in value:
                self.bad(_join(path, key), "required")
        return value

    def string(
        self,
        m: dict[str, Any],
        key: str,
        path: str,
        *,
        default: str,
        pattern: re.Pattern[str] | None = None,
        max_len: int | None = None,
        rule: str = "",
    ) -> str:
        """Read an optional string field."""
        if key not in m:
            return default
        value = m[key]
        ok = isinstance(value, str) and (pattern is None or pattern.fullmatch(value) is not None)
        if ok and max_len is not None and len(value) > max_len:
            ok = False
        if not ok:
            must = rule or (f"a string of at most {max_len} characters" if max_len else "a string")
            self.bad(path, f"must be {must}, got {value!r}")
            return default
        return str(value)

    def integer(
        self,
        m: dict[str, Any],
        key: str,
        path: str,
        *,
        default: int,
        lo: int,
        hi: int | None = None,
    ) -> int:
        """Read an optional integer field within ``lo..hi``."""
        if key not in m:
            return default
        value = m[key]
        if not is_int(value) or value < lo or (hi is not None and value > hi):
            must = f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"
            self.bad(path, f"must be {must}, got {value!r}")
            return default
        return int(value)

    def strings(
        self,
        m: dict[str, Any],
        key: str,
        path: str,
        *,
        default: tuple[str, ...],
        check: Callable[[str], str | None] | None,
        unique: bool = False,
        non_empty: bool = False,
    ) -> tuple[str, ...]:
        """Read an optional list of strings, checking each with ``check`` (None = fine)."""
        if key not in m:
            return default
        value = m[key]
        if not isinstance(value, list):
            self.bad(path, f"must be a list of strings, got {value!r}")
            return default
        if non_empty and not value:
            self.bad(path, "must not be empty")
        out: list[str] = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.bad(f"{path}[{i}]", f"must be a string, got {item!r}")
                continue
            problem = check(item) if check is not None else None
            if problem is not None:
                self.bad(f"{path}[{i}]", f"{problem}, got {item!r}")
            elif unique and item in out:
                self.bad(f"{path}[{i}]", f"{item!r} is listed twice")
            out.append(item)
        return tuple(out)

    def string_map(
        self,
        m: dict[str, Any],
        key: str,
        path: str,
        check: Callable[[str, str], str | None] | None,
    ) -> tuple[tuple[str, str], ...]:
        """Read an optional map of strings to strings, as sorted pairs."""
        if key not in m:
            return ()
        value = m[key]
        if not isinstance(value, dict):
            self.bad(path, f"must be a map of strings, got {value!r}")
            return ()
        out: list[tuple[str, str]] = []
        for k, v in value.items():
            if not isinstance(k, str) or not isinstance(v, str):
                self.bad(f"{path}.{k}", f"must be a string (quote it in YAML), got {v!r}")
                continue
            problem = check(k, v) if check is not None else None
            if problem is not None:
                self.bad(f"{path}.{k}", f"{problem}, got {v!r}")
                continue
            out.append((k, v))
        return tuple(sorted(out))


__all__ = ["Fields", "is_int"]
