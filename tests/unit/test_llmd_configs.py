"""EndpointPickerConfigs written to llm-d's schema load wherever Fleet has the capability.

tests/data/llmd/ holds Fleet's own configs in that schema (each says what it exercises);
together they use every plugin type and parameter Fleet accepts, which the first test checks.
The others assert what each builds, and that what Fleet lacks (tests/data/llmd/rejected/) is
refused naming the plugin and the profile.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleet.coordinator.router.config import load_config, load_config_file
from fleet.coordinator.router.pd import AlwaysDisaggPDDecider, PrefixBasedPDDecider
from fleet.coordinator.router.registry import PLUGIN_TYPES
from fleet.coordinator.router.scheduler import Profile, SchedulingConfig
from fleet.protocol.errors import ConfigError

DATA = Path(__file__).parent.parent / "data" / "llmd"
CONFIGS = sorted(DATA.glob("*.yaml"))
REJECTED = DATA / "rejected"
# Accepted names that are refused when given a value (Fleet has no encode stage).
REFUSED_IF_SET = {("disagg-profile-handler", "encodeDeciderPluginName")}
# Pieces of small inline P/D configs.
HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
PROFILES = (
    "schedulingProfiles:\n"
    "- {name: prefill, plugins: [{pluginRef: prefill-filter}]}\n"
    "- {name: decode, plugins: [{pluginRef: decode-filter}]}\n"
)
FILTERS = "- {type: prefill-filter}\n- {type: decode-filter}\n"


def load(name: str) -> SchedulingConfig:
    return load_config_file(DATA / f"{name}.yaml")


def shape(profile: Profile) -> tuple[list[str], list[tuple[str, float]], str]:
    return (
        [f.TYPE for f in profile.filters],
        [(w.scorer.TYPE, w.weight) for w in profile.scorers],
        profile.picker.TYPE,
    )


def test_the_configs_use_every_accepted_type_and_parameter() -> None:
    used: dict[str, set[str]] = {}
    for path in CONFIGS:
        for plugin in yaml.safe_load(path.read_text())["plugins"]:
            used.setdefault(plugin["type"], set()).update(plugin.get("parameters") or {})
    assert sorted(set(PLUGIN_TYPES) - set(used)) == []
    for type_, cls in PLUGIN_TYPES.items():
        if getattr(cls, "ANY_PARAMS", False):
            continue
        wanted = {p for p in cls.PARAMS if (type_, p) not in REFUSED_IF_SET}
        assert sorted(wanted - used[type_]) == [], type_


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_loads_and_logs_each_note_once(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="fleet.coordinator.router.config"):
        config = load_config_file(path)
    logged = [r.getMessage() for r in caplog.records]
    assert logged == [f"{path}: {note}" for note in config.notes]
    assert len(set(config.notes)) == len(config.notes)


def test_nested_pd_config_builds_its_named_profiles() -> None:
    config = load("pd-long-prompts")
    assert config.handler.TYPE == "disagg-profile-handler"
    assert (config.decode, config.prefill) == ("answer", "warm-up")
    assert isinstance(config.decider, PrefixBasedPDDecider)
    assert (config.decider.name, config.decider.non_cached_tokens) == ("split-long-prompts", 512)
    assert shape(config.primary) == (
        ["label-selector-filter"],
        [("prefix-cache-scorer", 3.0), ("active-request-scorer", 1.0)],
        "max-score-picker",
    )
    assert config.prefill_profile is not None
    assert shape(config.prefill_profile) == (
        ["label-selector-filter"],
        [("queue-scorer", 2.0), ("prefix-cache-scorer", 1.0)],
        "max-score-picker",
    )
    assert [f.name for f in config.primary.filters] == ["big-decoders"]
    assert [f.name for f in config.prefill_profile.filters] == ["prefillers"]
    assert [n.split(":")[0] for n in config.notes] == [
        "plugins[prefix].parameters.blockSizeTokens",
        "plugins[prefix].parameters.lruCapacityPerServer",
        "plugins[prefix].parameters.autoTune",
        "plugins[disagg-profile-handler].parameters.prefixPluginType",
        "plugins[disagg-profile-handler].parameters.prefixPluginName",
    ]
    assert config.needs_tokens and config.uses_metrics  # queue-scorer: prefill profile only


def test_the_pd_config_in_the_routing_docs_loads() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "ROUTING.md").read_text()
    text = doc.split("<!-- pd-config -->\n```yaml\n", 1)[1].split("```", 1)[0]
    config = load_config(text)
    assert (config.decode, config.prefill) == ("decode", "prefill")
    assert isinstance(config.decider, PrefixBasedPDDecider)
    assert config.decider.non_cached_tokens == 384
    assert config.notes == ()


def test_prefix_scorer_limits_are_kept_and_block_sizes_only_noted() -> None:
    nested: Any = load("pd-long-prompts").primary.scorers[0].scorer
    assert (nested.max_blocks, nested.max_tokens) == (512, None)
    tiers: Any = load("gpu-tiers").primary.scorers[1].scorer
    assert (tiers.TYPE, tiers.max_blocks, tiers.max_tokens) == ("prefix-cache-scorer", 256, 12000)
    old = load("pd-threshold-chars")
    assert [n.split(":")[0] for n in old.notes if n.startswith("plugins[cached]")] == [
        "plugins[cached].parameters.blockSize",
        "plugins[cached].parameters.hashBlockSize",
    ]


def test_old_pd_profile_handler_threshold_is_characters_turned_into_tokens() -> None:
    config = load("pd-threshold-chars")
    assert config.handler.TYPE == "pd-profile-handler"
    assert (config.decode, config.prefill) == ("gen", "ctx")
    assert isinstance(config.decider, PrefixBasedPDDecider)
    assert config.decider.non_cached_tokens == 50  # 200 characters at 4 a token
    notes = "\n".join(config.notes)
    for words in ("prefill-header-handler", "hashBlockSize", "primaryPort", "deprecated"):
        assert words in notes


def test_threshold_zero_splits_every_request_and_profiles_get_max_score() -> None:
    handler = "- type: pd-profile-handler\n  parameters: {threshold: 0}\n"
    config = load_config(HEAD + "plugins:\n" + FILTERS + handler + PROFILES)
    assert isinstance(config.decider, AlwaysDisaggPDDecider)
    assert config.primary.picker.TYPE == "max-score-picker"  # none declared: llm-d's default
    assert shape(config.primary)[:2] == (["decode-filter"], [])
    assert any("threshold 0: every request is split" in n for n in config.notes)


def test_pd_profile_handler_with_a_named_decider() -> None:
    config = load("pd-named-decider")
    assert isinstance(config.decider, PrefixBasedPDDecider)
    assert (config.decider.name, config.decider.non_cached_tokens) == ("over-128-uncached", 128)
    assert any(n.startswith("featureGates") for n in config.notes)
    assert any("(token-producer): not run" in n for n in config.notes)


def test_headers_handlers_are_accepted_and_say_what_fleet_does() -> None:
    config = load("pd-flat-params")
    (note,) = [n for n in config.notes if "disagg-headers-handler" in n]
    assert "sidecar" in note and "issue 17" in note


def test_flat_legacy_parameters_and_other_profile_names() -> None:
    config = load("pd-flat-params")
    assert (config.decode, config.prefill) == ("generation", "context")
    assert isinstance(config.decider, PrefixBasedPDDecider)
    assert config.decider.non_cached_tokens == 2048
    assert shape(config.primary) == (
        ["by-label-selector"],
        [("load-aware-scorer", 1.0)],
        "weighted-random-picker",  # no picker in the profile: the first declared
    )
    assert config.primary.filters[0].name == "generation-pool"
    scorer: Any = config.primary.scorers[0].scorer
    assert scorer.threshold == 16
    deprecated = [n.split(":")[0] for n in config.notes if "deprecated in llm-d; use" in n]
    assert deprecated == [
        f"plugins[disagg-profile-handler].parameters.{key}"
        for key in ("decodeProfile", "prefillProfile", "encodeProfile", "prefillDeciderPluginName")
    ]


def test_always_split_with_api_version_v1_and_the_oldest_decider_parameter() -> None:
    config = load("pd-always-split")
    assert isinstance(config.decider, AlwaysDisaggPDDecider)
    assert config.decider.name == "always-split"
    scorer: Any = config.primary.scorers[0].scorer
    assert (scorer.TYPE, scorer.idle, scorer.max_busy) == ("active-request-scorer", 3, 0.6)
    assert config.prefill_profile is not None and config.prefill_profile.scorers == ()
    notes = "\n".join(config.notes)
    assert "approx-prefix-cache-producer" in notes and "inflight-load-producer" in notes
    assert "deciderPluginName: deprecated" in notes


def test_data_layer_tokenizer_and_notification_source_are_accepted() -> None:
    config = load("tokenizer-data-layer")
    assert config.handler.TYPE == "single-profile-handler" and config.prefill is None
    assert shape(config.primary) == (
        ["decode-filter"],
        [("precise-prefix-cache-scorer", 5.0), ("kv-cache-utilization-scorer", 2.0)],
        "max-score-picker",
    )  # the tokenizer in the profile is skipped
    notes = "\n".join(config.notes)
    for words in ("dataLayer", "plugins[tokenizer]", "endpoint-notification-source"):
        assert words in notes
    precise: Any = config.primary.scorers[0].scorer
    assert (precise.max_blocks, precise.max_tokens) == (256, 32768)


def test_no_profiles_makes_llm_ds_default_profile() -> None:
    config = load("implicit-profile")
    assert config.primary.name == "default"
    assert shape(config.primary) == (
        ["decode-filter"],
        [("kv-cache-utilization-scorer", 1.0), ("queue-scorer", 1.0)],
        "max-score-picker",
    )
    assert [n.split(":")[0] for n in config.notes[:2]] == ["dataLayer", "parser"]


def test_flow_control_and_saturation_blocks_are_accepted() -> None:
    flow = load("priority-queues")
    assert flow.primary.picker.TYPE == "max-score-picker"
    assert any(n.startswith("flowControl") for n in flow.notes)
    saturation = load("shed-when-saturated")
    assert shape(saturation.primary) == (["healthy-filter"], [], "random-picker")
    assert any(n.startswith("saturationDetector") for n in saturation.notes)


def test_single_profile_configs_with_fleets_and_llm_ds_filters() -> None:
    assert shape(load("gpu-tiers").primary) == (
        ["by-label", "prompt-size-filter"],
        [("load-aware-scorer", 3.0), ("prefix-cache-scorer", 1.0)],
        "weighted-random-picker",
    )
    chat = load("chat-sessions")
    assert chat.primary.name == "chat" and chat.notes == ()
    assert shape(chat.primary) == (
        ["healthy-filter", "free-slot-filter", "load-imbalance-filter"],
        [
            ("session-affinity-scorer", 4.0),
            ("precise-prefix-cache-scorer", 3.0),
            ("recent-load-scorer", 0.5),
        ],
        "max-score-picker",
    )
    precise: Any = chat.primary.scorers[1].scorer
    assert precise.max_blocks == 1024
    assert shape(load("round-robin-baseline").primary) == (
        ["decode-filter", "healthy-filter"],
        [],
        "round-robin-picker",
    )


# -- what Fleet lacks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key", "words"),
    [
        ("prefill-affinity", "plugins[prefix-cache-affinity-filter].type", "profile 'warm-up'"),
        ("encode-stage", "plugins[vision-encoders].type", "profile 'images'"),
        ("cold-start-lru", "plugins[no-hit-lru-scorer].type", "profile 'chat'"),
        ("admitter", "plugins[probabilistic-admitter].type", "no such plugin"),
        ("data-parallel-ranks", "plugins[data-parallel-profile-handler].type", "no such plugin"),
    ],
)
def test_configs_fleet_cannot_run_are_refused(name: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config_file(REJECTED / f"{name}.yaml")
    assert err.value.key == key
    assert words in err.value.reason


@pytest.mark.parametrize(
    ("plugins", "key", "words"),
    [
        (
            "- {type: always-disagg-pd-decider}\n- type: disagg-profile-handler\n"
            "  parameters: {deciders: {encode: always-disagg-pd-decider}}\n",
            "plugins[disagg-profile-handler].parameters.deciders.encode",
            "encode",
        ),
        (
            "- type: disagg-profile-handler\n"
            "  parameters: {deciders: {prefill: x}, prefillProfile: prefill}\n",
            "plugins[disagg-profile-handler].parameters",
            "one form",
        ),
        (
            "- type: disagg-profile-handler\n  parameters: {deciders: {prefill: nope}}\n",
            "plugins[disagg-profile-handler].parameters.deciders.prefill",
            "no plugin of that name",
        ),
        (
            "- type: disagg-profile-handler\n  parameters: {deciders: {prefill: decode-filter}}\n",
            "plugins[disagg-profile-handler].parameters.deciders.prefill",
            "not a P/D decider",
        ),
        (
            "- type: disagg-profile-handler\n  parameters: {profiles: {decode: gen}}\n",
            "plugins[disagg-profile-handler].parameters.profiles.decode",
            "no scheduling profile",
        ),
        ("- {type: single-profile-handler}\n", "plugins[single-profile-handler]", "one profile"),
        ("", "schedulingProfiles", "need a profile handler"),
        (
            "- {type: disagg-profile-handler}\n- {type: pd-profile-handler}\n",
            "plugins[pd-profile-handler]",
            "second profile handler",
        ),
        (
            "- type: prefix-based-pd-decider\n  parameters: {nonCachedTokens: -1}\n",
            "plugins[prefix-based-pd-decider].parameters.nonCachedTokens",
            ">= 0",
        ),
        (
            "- type: pd-profile-handler\n  parameters: {threshold: -5}\n",
            "plugins[pd-profile-handler].parameters.threshold",
            ">= 0",
        ),
        (
            "- type: disagg-profile-handler\n  parameters: {deciders: {prefill: 3}}\n",
            "plugins[disagg-profile-handler].parameters.deciders",
            "must map",
        ),
    ],
)
def test_bad_pd_configs_name_the_plugin(plugins: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(HEAD + "plugins:\n" + FILTERS + plugins + PROFILES)
    assert err.value.key == key
    assert words in err.value.reason


def test_a_handler_in_a_profile_is_refused_naming_the_profile() -> None:
    text = (
        HEAD
        + "plugins:\n- {type: always-disagg-pd-decider}\n"
        + ("schedulingProfiles:\n- {name: p, plugins: [{pluginRef: always-disagg-pd-decider}]}\n")
    )
    with pytest.raises(ConfigError) as err:
        load_config(text)
    assert err.value.key == "schedulingProfiles[p].plugins[always-disagg-pd-decider]"


def test_without_a_prefill_decider_or_profile_nothing_is_split() -> None:
    no_decider = load_config(HEAD + "plugins:\n" + FILTERS + "- {type: disagg-profile-handler}\n"
                             + PROFILES)  # fmt: skip
    assert no_decider.decider is None and no_decider.prefill is None
    assert any("no deciders.prefill" in n for n in no_decider.notes)
    decode_only = (
        HEAD
        + "plugins:\n"
        + FILTERS
        + (
            "- {type: always-disagg-pd-decider}\n- type: disagg-profile-handler\n"
            "  parameters: {deciders: {prefill: always-disagg-pd-decider}}\n"
            "schedulingProfiles:\n- {name: decode, plugins: [{pluginRef: decode-filter}]}\n"
            "- {name: spare, plugins: [{pluginRef: prefill-filter}]}\n"
        )
    )
    config = load_config(decode_only)
    assert config.prefill is None and config.prefill_profile is None
    assert any("no scheduling profile 'prefill'" in n for n in config.notes)
    assert any("schedulingProfiles[spare]: accepted, never run" in n for n in config.notes)
