"""Load an llm-d ``EndpointPickerConfig`` YAML file into a scheduling profile.

Accepted: ``apiVersion`` ``llm-d.ai/v1alpha1`` or the older
``inference.networking.x-k8s.io/v1alpha1``; ``kind: EndpointPickerConfig``; ``plugins`` (``type``,
``name`` defaulting to the type, ``parameters``); ``schedulingProfiles`` (``pluginRef`` and
``weight``, default 1). As llm-d's loader does: a profile without a picker gets a
``max-score-picker``. ``featureGates``, ``dataLayer``, ``saturationDetector``, ``flowControl`` and
``parser`` are accepted and not used. Fleet runs one profile (P/D profiles come later).

Everything else is an error at start, naming the plugin and the profile: unknown types, duplicate
names, references to undeclared plugins, bad parameters, two pickers, a negative weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from fleet.protocol.errors import ConfigError

from . import sizeclass  # noqa: F401  (registers prompt-size-filter)
from .plugins import Filter, Picker, Plugin, Scorer, make_plugin
from .scheduler import Profile, WeightedScorer

API_VERSIONS = ("llm-d.ai/v1alpha1", "inference.networking.x-k8s.io/v1alpha1")
IGNORED_KEYS = ("featureGates", "dataLayer", "saturationDetector", "flowControl", "parser")

DEFAULT_CONFIG = """\
# Fleet's default scheduling: the engine holding the longest cached prefix of the prompt (from the
# global KV-block index); a new prefix goes to the engine with the least recent traffic; an engine
# that took clearly more than its share lately is left out, so hot prefixes spread instead of
# piling up on one engine (but a request that would lose more than 64 cached tokens by moving
# stays, once another engine holds part of its prefix); session affinity by x-session-id.
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: decode-filter
- type: load-imbalance-filter
  parameters: {maxOverMean: 1.15, slack: 4, halfLifeSeconds: 60, maxLostPrefixTokens: 64}
- type: precise-prefix-cache-scorer
- type: recent-load-scorer
- type: active-request-scorer
- type: session-affinity-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: decode-filter
  - pluginRef: load-imbalance-filter
  - pluginRef: precise-prefix-cache-scorer
    weight: 2
  - pluginRef: recent-load-scorer
    weight: 1
  - pluginRef: active-request-scorer
    weight: 1
  - pluginRef: session-affinity-scorer
    weight: 1
  - pluginRef: max-score-picker
"""


def load_config_file(path: str | Path) -> Profile:
    """Read and load a config file.

    Raises:
        ConfigError: unreadable file, or anything :func:`load_config` rejects.
    """
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("--scheduler-config", str(path), f"cannot be read: {exc}") from exc
    return load_config(text, source=str(path))


def load_config(text: str, *, source: str = "scheduler config") -> Profile:
    """Parse a config's YAML text into its scheduling profile.

    Raises:
        ConfigError: the key names what is wrong (``plugins[NAME]...``,
            ``schedulingProfiles[NAME]...``).
    """
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(source, "<yaml>", f"is not valid YAML: {exc}") from exc
    if not isinstance(doc, Mapping):
        raise ConfigError(source, type(doc).__name__, "must be a YAML mapping")
    if doc.get("apiVersion") not in API_VERSIONS:
        raise ConfigError("apiVersion", doc.get("apiVersion"), f"must be one of {API_VERSIONS}")
    if doc.get("kind") != "EndpointPickerConfig":
        raise ConfigError("kind", doc.get("kind"), "must be EndpointPickerConfig")
    unknown = sorted(
        set(doc) - {"apiVersion", "kind", "plugins", "schedulingProfiles", *IGNORED_KEYS}
    )
    if unknown:
        raise ConfigError(source, unknown, "unknown top-level key(s)")
    plugins = _plugins(doc.get("plugins"))
    profiles = doc.get("schedulingProfiles")
    if not isinstance(profiles, list) or not profiles:
        raise ConfigError("schedulingProfiles", profiles, "must be a non-empty list")
    if len(profiles) != 1:
        names = [p.get("name") if isinstance(p, Mapping) else p for p in profiles]
        raise ConfigError(
            "schedulingProfiles", names, "Fleet runs one profile (P/D profiles are not built yet)"
        )
    return _profile(profiles[0], plugins)


def _plugins(raw: Any) -> dict[str, Plugin]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("plugins", raw, "must be a non-empty list")
    plugins: dict[str, Plugin] = {}
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping) or not isinstance(item.get("type"), str):
            raise ConfigError(f"plugins[{i}]", item, "must be a mapping with a string type")
        extra = sorted(set(item) - {"name", "type", "parameters"})
        if extra:
            raise ConfigError(f"plugins[{i}]", extra, "unknown key(s)")
        name = item.get("name") or item["type"]
        if not isinstance(name, str):
            raise ConfigError(f"plugins[{i}].name", name, "must be a string")
        if name in plugins:
            raise ConfigError(f"plugins[{name}]", name, "duplicate plugin name")
        plugins[name] = make_plugin(name, item["type"], item.get("parameters"))
    return plugins


def _profile(raw: Any, plugins: Mapping[str, Plugin]) -> Profile:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str):
        raise ConfigError("schedulingProfiles[0]", raw, "must be a mapping with a name")
    name = raw["name"]
    where = f"schedulingProfiles[{name}]"
    refs = raw.get("plugins")
    if not isinstance(refs, list):
        raise ConfigError(f"{where}.plugins", refs, "must be a list")
    filters: list[Filter] = []
    scorers: list[WeightedScorer] = []
    picker: Picker | None = None
    seen: set[str] = set()
    for ref in refs:
        if not isinstance(ref, Mapping) or not isinstance(ref.get("pluginRef"), str):
            raise ConfigError(f"{where}.plugins", ref, "each entry needs a pluginRef")
        plugin = plugins.get(ref["pluginRef"])
        if plugin is None:
            raise ConfigError(
                f"{where}.plugins[{ref['pluginRef']}]", ref["pluginRef"], "no plugin of that name"
            )
        if plugin.name in seen:
            raise ConfigError(f"{where}.plugins[{plugin.name}]", plugin.name, "referenced twice")
        seen.add(plugin.name)
        weight = ref.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
            raise ConfigError(f"{where}.plugins[{plugin.name}].weight", weight, "must be >= 0")
        if isinstance(plugin, Filter):
            filters.append(plugin)
        elif isinstance(plugin, Scorer):
            scorers.append(WeightedScorer(plugin, float(weight)))
        elif isinstance(plugin, Picker):
            if picker is not None:
                raise ConfigError(f"{where}.plugins[{plugin.name}]", plugin.name, "a second picker")
            picker = plugin
    if picker is None:
        made = make_plugin("max-score-picker", "max-score-picker", None)
        assert isinstance(made, Picker)
        picker = made
    return Profile(name, tuple(filters), tuple(scorers), picker)


__all__ = ["API_VERSIONS", "DEFAULT_CONFIG", "load_config", "load_config_file"]
