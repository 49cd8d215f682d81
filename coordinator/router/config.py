"""Load an llm-d ``EndpointPickerConfig`` YAML file into the scheduler's profiles and handler.

Accepted as llm-d's loader takes it (llm-d-inference-scheduler ``pkg/epp/config/loader/``):
``apiVersion`` ``llm-d.ai/v1alpha1``, the deprecated ``inference.networking.x-k8s.io/v1alpha1``,
or ``llm-d.ai/v1`` (llm-d's guides/pd-disaggregation/router/pd-disaggregation.values.yaml);
``kind: EndpointPickerConfig``; ``plugins`` (``type``, ``name`` defaulting to the type,
``parameters``); ``schedulingProfiles`` (``pluginRef`` and ``weight``, default 1). As llm-d's
``defaults.go`` does: no ``schedulingProfiles`` makes a ``default`` profile of every filter,
scorer and picker; a profile without a picker gets the first declared picker, else a
``max-score-picker``; one profile and no handler runs under ``single-profile-handler``.

Several profiles need a profile handler (:mod:`.pd`): ``disagg-profile-handler`` (or the
deprecated ``pd-profile-handler``) runs the ``decode`` profile and, when its decider says so, the
``prefill`` profile. Plugin types whose job Fleet does another way (:mod:`.elsewhere`), the
``featureGates``, ``dataLayer``, ``saturationDetector``, ``flowControl`` and ``parser`` blocks,
and deprecated or unused parameters are accepted: the loader logs once what Fleet does instead
(:attr:`.scheduler.SchedulingConfig.notes`).

Everything else is an error at start, naming the plugin and the profile: types Fleet lacks,
duplicate names, references to undeclared plugins, bad parameters, two pickers in a profile,
two profile handlers, a negative weight, several profiles without a handler.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from fleet.protocol.errors import ConfigError

from .elsewhere import HandledElsewhere
from .pd import Decider, ProfileHandler, SingleProfileHandler
from .plugins import Filter, Params, Picker, Plugin, Scorer
from .registry import PLUGIN_TYPES, make_plugin
from .scheduler import Profile, SchedulingConfig, WeightedScorer

log = logging.getLogger(__name__)

API_VERSIONS = ("llm-d.ai/v1alpha1", "inference.networking.x-k8s.io/v1alpha1", "llm-d.ai/v1")
# Top-level blocks Fleet accepts and does not read (apix/config/v1alpha1/
# endpointpickerconfig_types.go), and what Fleet does instead.
IGNORED_KEYS = {
    "featureGates": "no feature gates: every Fleet plugin is always on",
    "dataLayer": "the coordinator scrapes engine metrics and learns engines from their agents",
    "saturationDetector": "admission control caps requests in flight (--engine-slots)",
    "flowControl": "admission control queues requests by x-priority (--max-queue)",
    "parser": "the coordinator parses and validates OpenAI requests itself",
}

DEFAULT_CONFIG = """\
# Fleet's default scheduling: among engines with a free slot (fewer requests in flight than
# --engine-slots), the engine holding the longest cached prefix of the prompt (from the
# global KV-block index); a new prefix goes to the engine with the least recent traffic; an engine
# that took clearly more than its share lately is left out, so hot prefixes spread instead of
# piling up on one engine (but a request that would lose more than 64 cached tokens by moving
# stays, once another engine holds part of its prefix); session affinity by x-session-id.
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: decode-filter
- type: free-slot-filter
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
  - pluginRef: free-slot-filter
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


def load_config_file(path: str | Path) -> SchedulingConfig:
    """Read and load a config file.

    Raises:
        ConfigError: unreadable file, or anything :func:`load_config` rejects.
    """
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError("--scheduler-config", str(path), f"cannot be read: {exc}") from exc
    return load_config(text, source=str(path))


def load_config(text: str, *, source: str = "scheduler config") -> SchedulingConfig:
    """Parse a config's YAML text into its profiles and handler; log each note once.

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
    notes = [f"{key}: accepted, not read; {why}" for key, why in IGNORED_KEYS.items() if key in doc]
    specs = _specs(doc.get("plugins"))
    raw_profiles = _raw_profiles(doc.get("schedulingProfiles"), specs)
    for name, (type_, _) in specs.items():
        if type_ not in PLUGIN_TYPES:
            users = [
                p for p, refs in raw_profiles.items() if any(r["pluginRef"] == name for r in refs)
            ]
            where = f" (in profile {', '.join(map(repr, users))})" if users else ""
            raise ConfigError(
                f"plugins[{name}].type",
                type_,
                f"unknown plugin type{where}: Fleet has no such plugin (the types it has: "
                "docs/ROUTING.md)",
            )
    plugins = {name: make_plugin(name, type_, params) for name, (type_, params) in specs.items()}
    profiles = {name: _profile(name, refs, plugins) for name, refs in raw_profiles.items()}
    config = _handle(plugins, profiles)
    for plugin in plugins.values():
        notes += plugin.notes
    notes += config.notes
    for note in notes:
        log.info("%s: %s", source, note)
    return SchedulingConfig(
        profiles, config.handler, config.decode, config.prefill, config.decider, tuple(notes)
    )


def _specs(raw: Any) -> dict[str, tuple[str, Any]]:
    """The declared plugins: name -> (type, raw parameters)."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError("plugins", raw, "must be a non-empty list")
    specs: dict[str, tuple[str, Any]] = {}
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping) or not isinstance(item.get("type"), str):
            raise ConfigError(f"plugins[{i}]", item, "must be a mapping with a string type")
        extra = sorted(set(item) - {"name", "type", "parameters"})
        if extra:
            raise ConfigError(f"plugins[{i}]", extra, "unknown key(s)")
        name = item.get("name") or item["type"]
        if not isinstance(name, str):
            raise ConfigError(f"plugins[{i}].name", name, "must be a string")
        if name in specs:
            raise ConfigError(f"plugins[{name}]", name, "duplicate plugin name")
        specs[name] = (item["type"], item.get("parameters"))
    return specs


def _raw_profiles(
    raw: Any, specs: Mapping[str, tuple[str, Any]]
) -> dict[str, list[Mapping[str, Any]]]:
    """Each profile's plugin references, checked for shape; none given: llm-d's ``default``
    profile of every filter, scorer and picker (loader/defaults.go, ensureSchedulingLayer)."""
    if raw is None or raw == []:
        kinds = ("filter", "scorer", "picker")
        refs: list[Mapping[str, Any]] = [
            {"pluginRef": name}
            for name, (type_, _) in specs.items()
            if getattr(PLUGIN_TYPES.get(type_), "KIND", "") in kinds
        ]
        return {"default": refs}
    if not isinstance(raw, list):
        raise ConfigError("schedulingProfiles", raw, "must be a list")
    out: dict[str, list[Mapping[str, Any]]] = {}
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
            raise ConfigError(f"schedulingProfiles[{i}]", item, "must be a mapping with a name")
        name = item["name"]
        where = f"schedulingProfiles[{name}]"
        if name in out:
            raise ConfigError(where, name, "duplicate profile name")
        extra = sorted(set(item) - {"name", "plugins"})
        if extra:
            raise ConfigError(where, extra, "unknown key(s)")
        refs = item.get("plugins", [])
        if not isinstance(refs, list):
            raise ConfigError(f"{where}.plugins", refs, "must be a list")
        for ref in refs:
            if not isinstance(ref, Mapping) or not isinstance(ref.get("pluginRef"), str):
                raise ConfigError(f"{where}.plugins", ref, "each entry needs a pluginRef")
            extra = sorted(set(ref) - {"pluginRef", "weight"})
            if extra:
                raise ConfigError(f"{where}.plugins[{ref['pluginRef']}]", extra, "unknown key(s)")
            if ref["pluginRef"] not in specs:
                raise ConfigError(
                    f"{where}.plugins[{ref['pluginRef']}]",
                    ref["pluginRef"],
                    "no plugin of that name",
                )
        out[name] = refs
    return out


def _profile(name: str, refs: list[Mapping[str, Any]], plugins: Mapping[str, Plugin]) -> Profile:
    where = f"schedulingProfiles[{name}]"
    filters: list[Filter] = []
    scorers: list[WeightedScorer] = []
    picker: Picker | None = None
    seen: set[str] = set()
    for ref in refs:
        plugin = plugins[ref["pluginRef"]]
        at = f"{where}.plugins[{plugin.name}]"
        if plugin.name in seen:
            raise ConfigError(at, plugin.name, "referenced twice")
        seen.add(plugin.name)
        weight = ref.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
            raise ConfigError(f"{at}.weight", weight, "must be >= 0")
        if isinstance(plugin, Filter):
            filters.append(plugin)
        elif isinstance(plugin, Scorer):
            scorers.append(WeightedScorer(plugin, float(weight)))
        elif isinstance(plugin, Picker):
            if picker is not None:
                raise ConfigError(at, plugin.name, "a second picker")
            picker = plugin
        elif isinstance(plugin, ProfileHandler | Decider):
            raise ConfigError(at, plugin.name, f"a {plugin.KIND} belongs in plugins, not a profile")
        else:
            assert isinstance(plugin, HandledElsewhere)  # skipped; its note says why
    if picker is None:
        # llm-d reuses a declared picker, else adds a max-score-picker (defaults.go).
        declared = [p for p in plugins.values() if isinstance(p, Picker)]
        made = (
            declared[0] if declared else make_plugin("max-score-picker", "max-score-picker", None)
        )
        assert isinstance(made, Picker)
        picker = made
    return Profile(name, tuple(filters), tuple(scorers), picker)


def _handle(plugins: Mapping[str, Plugin], profiles: Mapping[str, Profile]) -> SchedulingConfig:
    """The profile handler, the profiles it runs and the prefill decider, checked as llm-d's
    loader checks them (configloader.go, buildSchedulerConfig). Profiles are not stored here."""
    names = list(profiles)
    handlers = [p for p in plugins.values() if isinstance(p, ProfileHandler)]
    if len(handlers) > 1:
        raise ConfigError(
            f"plugins[{handlers[1].name}]", handlers[1].TYPE, f"a second profile handler "
            f"(after {handlers[0].name!r}); a config has one"
        )  # fmt: skip
    if not handlers:
        if len(names) > 1:
            raise ConfigError(
                "schedulingProfiles", names, "several profiles need a profile handler "
                "(disagg-profile-handler for prefill/decode)"
            )  # fmt: skip
        handler: ProfileHandler = SingleProfileHandler(
            SingleProfileHandler.TYPE, Params("", None, ())
        )
    else:
        handler = handlers[0]
    where = f"plugins[{handler.name}]"
    if handler.decode_profile is None:  # single-profile-handler
        if len(names) > 1:
            raise ConfigError(
                where, names, f"{handler.TYPE} runs one profile; use disagg-profile-handler"
            )
        return SchedulingConfig({}, handler, names[0])
    decode, prefill = handler.decode_profile, handler.prefill_profile
    if decode not in profiles:
        raise ConfigError(
            f"{where}.parameters.profiles.decode",
            decode,
            f"no scheduling profile of that name (profiles: {names})",
        )
    notes = []
    ref = handler.decider_ref(plugins)
    decider = plugins.get(ref) if isinstance(ref, str) else ref
    if isinstance(ref, str) and decider is None:
        raise ConfigError(f"{where}.parameters.deciders.prefill", ref, "no plugin of that name")
    if decider is not None and not isinstance(decider, Decider):
        raise ConfigError(
            f"{where}.parameters.deciders.prefill", ref, f"is a {decider.TYPE}, not a P/D decider "
            "(prefix-based-pd-decider or always-disagg-pd-decider)"
        )  # fmt: skip
    if decider is not None and prefill not in profiles:
        notes.append(
            f"{where}: no scheduling profile {prefill!r}, so no request is split (as in llm-d)"
        )
        decider = None
    run = {decode, prefill} if decider is not None else {decode}
    for name in names:
        if name not in run:
            notes.append(f"schedulingProfiles[{name}]: accepted, never run by {handler.TYPE}")
    return SchedulingConfig(
        {}, handler, decode, prefill if decider else None, decider, tuple(notes)
    )


__all__ = ["API_VERSIONS", "DEFAULT_CONFIG", "load_config", "load_config_file"]
