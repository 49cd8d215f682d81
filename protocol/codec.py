"""Encode and decode agent ⇄ coordinator messages.

A message travels as two ZMQ frames: a header naming the protocol and its version
(``b"fleet/1"``), then a msgpack map of the message's fields plus ``"type"``. Decoding checks
every field against the dataclass's type hints; anything that does not fit raises a
:class:`ProtocolError` naming the field, so a receiver can log, count and carry on. Unknown keys
are ignored (a newer peer may add optional fields); a different version is rejected whole.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Sequence
from typing import Any

import msgpack

from .errors import ProtocolError
from .kvevents import KV_EVENT_TYPES
from .messages import MESSAGE_TYPES, PROTOCOL_VERSION, Message

HEADER = f"fleet/{PROTOCOL_VERSION}".encode()
MAX_FRAME_BYTES = 64 * 1024 * 1024


def encode(msg: Message) -> list[bytes]:
    """Return the frames that carry ``msg``.

    Args:
        msg: the message.

    Returns:
        ``[HEADER, msgpack payload]``.

    Raises:
        TypeError: ``msg`` holds a value msgpack cannot carry (a bug in the caller).
    """
    # msgpack packs tuples and scalars itself and calls _to_wire only for dataclasses, so
    # long token-id tuples are not walked in Python.
    return [HEADER, msgpack.packb(msg, default=_to_wire, use_bin_type=True)]


def decode(frames: Sequence[bytes]) -> Message:
    """Decode the frames of one message.

    Raises:
        ProtocolError: wrong frame count, unknown protocol version, bad msgpack, unknown
            message type, or a field of the wrong type (the error names it).
    """
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames (header, payload), got {len(frames)}")
    header, payload = frames
    if header != HEADER:
        raise ProtocolError(f"unsupported protocol header {bytes(header[:32])!r}, want {HEADER!r}")
    if len(payload) > MAX_FRAME_BYTES:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        data = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"undecodable msgpack payload: {exc}") from exc
    if not isinstance(data, dict):
        raise ProtocolError(f"payload is {type(data).__name__}, not a map")
    tag = data.get("type")
    cls = MESSAGE_TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {tag!r}", field="type")
    return typing.cast(Message, _from_wire(cls, data, cls.TYPE))


def _to_wire(obj: Any) -> dict[str, Any]:
    """msgpack's ``default`` hook: a dataclass as a map, ``type`` first (nested values are
    packed by msgpack, which calls back here for nested dataclasses)."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"cannot encode {type(obj).__name__}: {obj!r:.60}")
    out: dict[str, Any] = {}
    tag = getattr(type(obj), "TYPE", None)
    if tag is not None:
        out["type"] = tag
    for f in dataclasses.fields(obj):
        out[f.name] = getattr(obj, f.name)
    return out


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def _exact_types(hint: Any) -> frozenset[type] | None:
    """The exact runtime types that ``hint`` accepts unchanged, or None if it needs converting.

    Only for str, bytes, int, bool, None and unions of them (float needs a finiteness check
    and int -> float conversion; ``type(v) in`` keeps bool out of int).
    """
    if hint in (str, bytes, int, bool, type(None)):
        return frozenset({hint})
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        parts = [_exact_types(arg) for arg in typing.get_args(hint)]
        if all(p is not None for p in parts):
            return frozenset().union(*typing.cast(list[frozenset[type]], parts))
    return None


def _from_wire(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ProtocolError(f"expected a map, got {type(data).__name__}", field=path)
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        where = f"{path}.{f.name}"
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError("missing required field", field=where)
            continue
        kwargs[f.name] = _convert(hints[f.name], data[f.name], where)
    return cls(**kwargs)


def _convert(hint: Any, value: Any, path: str) -> Any:  # noqa: PLR0911 - one branch per type
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        # KV events are a tagged union of dataclasses.
        if all(dataclasses.is_dataclass(a) for a in args):
            return _convert_kv_event(value, path)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ProtocolError:
                continue
        raise ProtocolError(f"{value!r:.60} matches none of {hint}", field=path)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ProtocolError(f"expected a list, got {type(value).__name__}", field=path)
        (item, _ellipsis) = typing.get_args(hint)
        exact = _exact_types(item)
        if exact is not None and all(type(v) in exact for v in value):
            return tuple(value)  # fast path (token ids, hashes); the slow one names the culprit
        return tuple(_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return _from_wire(typing.cast(type, hint), value, path)
    if hint is bool:
        if not isinstance(value, bool):
            raise ProtocolError(f"expected bool, got {type(value).__name__}", field=path)
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ProtocolError(f"expected int, got {type(value).__name__}", field=path)
        return value
    if hint is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ProtocolError(f"expected float, got {type(value).__name__}", field=path)
        if not math.isfinite(value):
            raise ProtocolError(f"non-finite number {value!r}", field=path)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ProtocolError(f"expected str, got {type(value).__name__}", field=path)
        return value
    if hint is bytes:
        if not isinstance(value, bytes):
            raise ProtocolError(f"expected bytes, got {type(value).__name__}", field=path)
        return value
    raise TypeError(f"codec cannot handle {hint!r} at {path}")  # a bug in messages.py, not input


def _convert_kv_event(value: Any, path: str) -> Any:
    if not isinstance(value, dict):
        raise ProtocolError(f"expected an event map, got {type(value).__name__}", field=path)
    tag = value.get("type")
    cls = KV_EVENT_TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ProtocolError(f"unknown KV event type {tag!r}", field=f"{path}.type")
    return _from_wire(cls, value, path)


__all__ = ["HEADER", "MAX_FRAME_BYTES", "decode", "encode"]
