"""Header lists Fleet sends (engine requests, client responses), checked in one pass.

Checking each header with two regular expressions and a few calls, as h11 does, was a
noticeable share of the coordinator's CPU per request. :func:`valid` applies h11's own rules
(a name is an HTTP token; a value has no NUL, CR, LF, VT or FF, and no leading or trailing
blank) to all names at once and all values at once. Where a list fails, the caller names the
header: :mod:`.http1server` raises ``BadHeader``, :mod:`.engineclient` lets h11 raise its usual
error.
"""

from __future__ import annotations

import re

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_VALUE = rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?"  # h11's field_value
# Joined by "\n", which no valid name or value contains (counted: one that does fails), so one
# match checks them all.
_NAMES = re.compile(_TOKEN + rb"(?:\n" + _TOKEN + rb")*")
_VALUES = re.compile(_VALUE + rb"(?:\n" + _VALUE + rb")*")


def valid(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether h11 would accept every (name, value) of ``headers`` (bytes) as they are."""
    if not headers:
        return True
    names = b"\n".join([n for n, _ in headers])
    values = b"\n".join([v for _, v in headers])
    seps = len(headers) - 1  # a name or value holding "\n" itself would add one
    return (
        names.count(b"\n") == seps
        and values.count(b"\n") == seps
        and _NAMES.fullmatch(names) is not None
        and _VALUES.fullmatch(values) is not None
    )


__all__ = ["valid"]
