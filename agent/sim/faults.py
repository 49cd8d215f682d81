"""Faults a simulated engine can be told to have, at start (``--sim-fault``) or at run time
(``POST /sim/faults``).

=======================  =========  ==========================================================
name                     value      effect
=======================  =========  ==========================================================
crash                    bool       exit with status 1 at once (no cleanup, like a segfault)
hang                     bool       the engine loop stops stepping: requests stall, while
                                    ``/health`` keeps answering 200 (vLLM's API server does the
                                    same while its engine core is stuck)
slow_factor              > 0        every step takes this many times as long
fail_fraction            0..1       this share of inference requests gets HTTP 500
kv_drop_fraction         0..1       this share of KV batches is not sent (the sequence number
                                    is still used, so subscribers see a gap; replay has it)
kv_duplicate_fraction    0..1       this share of KV batches is sent twice (same sequence)
=======================  =========  ==========================================================

:class:`FaultState` is immutable; :meth:`FaultState.updated` validates a JSON update and returns
the new state, so a bad request changes nothing.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Final, Literal

from fleet.protocol.errors import ConfigError

KVAction = Literal["send", "drop", "duplicate"]

_BOOL_FAULTS: Final[tuple[str, ...]] = ("crash", "hang")
_FRACTIONS: Final[tuple[str, ...]] = ("fail_fraction", "kv_drop_fraction", "kv_duplicate_fraction")
FAULT_NAMES: Final[tuple[str, ...]] = (*_BOOL_FAULTS, "slow_factor", *_FRACTIONS)


@dataclass(frozen=True)
class FaultState:
    """The faults in force (all off by default).

    Raises:
        ConfigError: a value out of range; the key names the fault.
    """

    crash: bool = False
    hang: bool = False
    slow_factor: float = 1.0
    fail_fraction: float = 0.0
    kv_drop_fraction: float = 0.0
    kv_duplicate_fraction: float = 0.0

    def __post_init__(self) -> None:
        for key in _BOOL_FAULTS:
            if type(getattr(self, key)) is not bool:
                raise ConfigError(key, getattr(self, key), "must be true or false")
        slow = self.slow_factor
        if type(slow) not in (int, float) or not math.isfinite(slow) or slow <= 0:
            raise ConfigError("slow_factor", slow, "must be a finite number > 0")
        for key in _FRACTIONS:
            value = getattr(self, key)
            if type(value) not in (int, float) or not 0.0 <= value <= 1.0:
                raise ConfigError(key, value, "must be a number within 0..1")

    def as_json(self) -> dict[str, Any]:
        """The state as ``GET /sim/faults`` returns it."""
        return asdict(self)

    def updated(self, changes: Mapping[str, Any]) -> FaultState:
        """Return this state with ``changes`` applied (keys not given keep their value).

        Args:
            changes: a decoded JSON object, e.g. ``{"hang": true, "slow_factor": 2}``.

        Returns:
            The new state.

        Raises:
            ConfigError: an unknown key, or a value of the wrong type or out of range.
        """
        unknown = sorted(set(changes) - set(FAULT_NAMES))
        if unknown:
            raise ConfigError(unknown[0], changes[unknown[0]], f"unknown fault; know {FAULT_NAMES}")
        values: dict[str, Any] = {}
        for key, value in changes.items():
            if key not in _BOOL_FAULTS:
                if type(value) not in (int, float):
                    raise ConfigError(key, value, "must be a number")
                value = float(value)
            values[key] = value
        return replace(self, **values)

    @classmethod
    def from_specs(cls, specs: Iterable[str]) -> FaultState:
        """Build the start-up state from ``--sim-fault NAME[=VALUE]`` arguments.

        Args:
            specs: e.g. ``["hang", "slow_factor=3", "kv_drop_fraction=0.1"]``; a bare name sets
                a boolean fault; ``crash=false`` is allowed.

        Returns:
            The state.

        Raises:
            ConfigError: an unknown name or a bad value (key ``--sim-fault``).
        """
        changes: dict[str, Any] = {}
        for spec in specs:
            name, sep, text = spec.partition("=")
            name = name.strip().replace("-", "_")
            if name in _BOOL_FAULTS:
                if sep and text.lower() not in ("true", "false", "1", "0"):
                    raise ConfigError("--sim-fault", spec, "a boolean fault takes true or false")
                changes[name] = not sep or text.lower() in ("true", "1")
            elif name in FAULT_NAMES:
                try:
                    changes[name] = float(text)
                except ValueError as exc:
                    raise ConfigError("--sim-fault", spec, "needs NAME=NUMBER") from exc
            else:
                raise ConfigError("--sim-fault", spec, f"unknown fault; know {FAULT_NAMES}")
        try:
            return cls().updated(changes)
        except ConfigError as exc:
            raise ConfigError("--sim-fault", f"{exc.key}={exc.value}", exc.reason) from exc

    def fails_request(self, rng: random.Random) -> bool:
        """Draw whether the next inference request fails with HTTP 500."""
        return self.fail_fraction > 0 and rng.random() < self.fail_fraction

    def kv_action(self, rng: random.Random) -> KVAction:
        """Draw what happens to the next KV batch: sent, dropped or sent twice."""
        if self.kv_drop_fraction > 0 and rng.random() < self.kv_drop_fraction:
            return "drop"
        if self.kv_duplicate_fraction > 0 and rng.random() < self.kv_duplicate_fraction:
            return "duplicate"
        return "send"


__all__ = ["FAULT_NAMES", "FaultState", "KVAction"]
