"""Fleet's failure-recovery suite: faults injected into a running fleet under load, measured.

Layers, each built on the ones before it:

- :mod:`.outcomes`: sans-I/O; what a request's answer was (succeeded, failed, lost, broken),
  the figures of a set of requests, and when a watched engine left and rejoined routing;
- :mod:`.load`: trio + httpx load against the coordinator, every answer judged;
- :mod:`.target`: the fleet seen from outside (API, metrics, engine processes, a watcher);
- the scenarios (:mod:`.engine_faults`, :mod:`.kvcheck`, :mod:`.overload`,
  :mod:`.malformed_http`, :mod:`.malformed_wire`), registered by name in :mod:`.scenarios`;
- :mod:`.report` writes the figures; :mod:`.cli` is ``fleet chaos``.
"""

from .errors import ChaosError
from .outcomes import Outcome, Record, figures, judge
from .scenarios import ChaosConfig, Figures, Scenario, missed, run, scenarios
from .target import Target, connect

__all__ = [
    "ChaosConfig",
    "ChaosError",
    "Figures",
    "Outcome",
    "Record",
    "Scenario",
    "Target",
    "connect",
    "figures",
    "judge",
    "missed",
    "run",
    "scenarios",
]
