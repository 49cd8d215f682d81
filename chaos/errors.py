"""Errors of the chaos suite.

::

    FleetError
     └── ChaosError          the fleet under test cannot be driven: unreachable, engines never
                             ready, a fault that cannot be injected, an unknown scenario

A scenario whose targets are missed does not raise: its figures say so
(:func:`fleet.chaos.scenarios.missed`).
"""

from __future__ import annotations

from fleet.protocol.errors import FleetError


class ChaosError(FleetError):
    """The fleet under test cannot be driven (the message says why)."""


__all__ = ["ChaosError"]
