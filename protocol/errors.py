"""Fleet's error tree.

Every error Fleet raises on purpose derives from :class:`FleetError`::

    FleetError
    ├── ProtocolError      a wire frame or message that cannot be accepted (names the field)
    ├── ConfigError        a configuration key with a bad value (names the key and value)
    └── (agent/coordinator errors.py extend the tree for their own boundaries)

``protocol`` imports nothing of Fleet's, so both sides can share this root.
"""

from __future__ import annotations


class FleetError(Exception):
    """Root of every error Fleet raises on purpose."""


class ProtocolError(FleetError):
    """Raised when a frame or message off the wire cannot be accepted.

    Args:
        message: what is wrong, for a log line.
        field: the field at fault, when one is ("" for framing errors).
    """

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class ConfigError(FleetError):
    """Raised when a configuration value is invalid; the message names the key and the value."""

    def __init__(self, key: str, value: object, reason: str) -> None:
        super().__init__(f"{key}={value!r}: {reason}")
        self.key = key
        self.value = value
        self.reason = reason
