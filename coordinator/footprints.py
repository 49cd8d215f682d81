"""How much GPU memory each engine of a deployment needs, from its local model folder.

:func:`with_memory` fills :attr:`~.deployment.Deployment.memory` for deployments of GPU engines
whose model is a local folder: the weights from the safetensors headers (no weights loaded) and
the model's shape from ``config.json`` (:mod:`.modelsize`), with the engine arguments, through
vLLM's budget rules (:mod:`.gpumemory`). A folder that cannot be read leaves ``memory`` None
(placement then takes any free GPU) and says why in the log. Footprints are cached per path.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from fleet.protocol.errors import FleetError

from .deployment import Deployment
from .engineargs import EngineArgs
from .gpumemory import engine_memory
from .modelsize import ModelFootprint, read_footprint

log = logging.getLogger(__name__)


def with_memory(
    deployments: tuple[Deployment, ...], cache: dict[str, ModelFootprint | None]
) -> tuple[Deployment, ...]:
    """``deployments`` with ``memory`` set where it can be known (see the module docstring)."""
    out: list[Deployment] = []
    for d in deployments:
        if d.gpus_per_engine <= 0 or d.memory is not None or "://" in d.model_path:
            out.append(d)
            continue
        if d.model_path not in cache:
            try:
                cache[d.model_path] = read_footprint(Path(d.model_path))
            except (FleetError, OSError) as exc:
                log.warning("GPU memory of %s unknown, placing by GPU count: %s", d.name, exc)
                cache[d.model_path] = None
        footprint = cache[d.model_path]
        if footprint is None:
            out.append(d)
            continue
        try:
            args = EngineArgs.parse(d.extra_args)
        except FleetError as exc:
            log.warning("GPU memory of %s unknown, placing by GPU count: %s", d.name, exc)
            out.append(d)
            continue
        args = dataclasses.replace(args, max_model_len=d.max_model_len)
        memory = engine_memory(footprint, args, d.gpus_per_engine)
        out.append(dataclasses.replace(d, memory=memory))
    return tuple(out)


__all__ = ["with_memory"]
