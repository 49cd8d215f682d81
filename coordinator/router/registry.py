"""Every plugin type by its llm-d name, and :func:`make_plugin` (llm-d's plugin registry,
``pkg/epp/framework/plugins/register.go``).

The kinds and their types: :mod:`.filters`, :mod:`.scorers`, :mod:`.pickers`,
:mod:`.sizeclass` (Fleet's ``prompt-size-filter``), :mod:`.pd` (profile handlers and P/D
deciders) and :mod:`.elsewhere` (llm-d types whose job Fleet does another way: accepted, not
run). A type not here is one Fleet does not have, and a config naming it is refused.
"""

from __future__ import annotations

from typing import Any

from fleet.protocol.errors import ConfigError

from . import elsewhere, filters, pd, pickers, scorers, sizeclass
from .plugins import Params, Plugin

PLUGIN_TYPES: dict[str, type[Plugin]] = {
    cls.TYPE: cls
    for module in (filters, scorers, pickers, sizeclass, pd, elsewhere)
    for cls in module.TYPES
}


def make_plugin(name: str, type_: str, raw_params: Any) -> Plugin:
    """Build one plugin.

    Raises:
        ConfigError: unknown type or bad parameters (the message names the plugin).
    """
    cls = PLUGIN_TYPES.get(type_)
    if cls is None:
        raise ConfigError(
            f"plugins[{name}].type", type_, f"unknown plugin type; Fleet has {sorted(PLUGIN_TYPES)}"
        )
    known: Any = cls.PARAMS
    if getattr(cls, "ANY_PARAMS", False) and isinstance(raw_params, dict):
        known = list(raw_params)
    return cls(name, Params(name, raw_params, known))


__all__ = ["PLUGIN_TYPES", "make_plugin"]
