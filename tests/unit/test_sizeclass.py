"""``prompt-size-filter``: requests to GPU tiers by prompt size, from an EndpointPickerConfig."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from fleet.coordinator.kvindex import KVIndex
from fleet.coordinator.registry import EngineView
from fleet.coordinator.router.config import load_config
from fleet.coordinator.router.prompt import RoutingRequest
from fleet.coordinator.router.scheduler import Scheduler
from fleet.protocol.errors import ConfigError

HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
CONFIG = (
    HEADER
    + """
plugins:
- type: prompt-size-filter
  parameters:
    classes:
    - {maxPromptTokens: 16, values: [l4]}
    - {maxPromptTokens: 64, values: [a100, l4]}
    - {values: [h100]}
- {type: random-picker}
schedulingProfiles:
- name: p
  plugins: [{pluginRef: prompt-size-filter}, {pluginRef: random-picker}]
"""
)


def view(engine_id: str, tier: str) -> EngineView:
    return EngineView(engine_id, "n1", "m", f"http://127.0.0.1/{engine_id}", 1, "ready", "both",
                      "sim", 0, 16, (0,), True, tier=tier)  # fmt: skip


ENGINES = [view("small", "l4"), view("mid", "a100"), view("big", "h100")]


def chosen(engines: list[EngineView], prompt_tokens: int | None, config: str = CONFIG) -> set[str]:
    s = Scheduler(load_config(config), KVIndex(), rng=random.Random(0))
    tokens = tuple(range(prompt_tokens)) if prompt_tokens is not None else None
    out = set()
    for _ in range(30):
        d = s.schedule(RoutingRequest("m", tokens), engines, lambda _: 0, 0.0)
        assert d.engine is not None
        out.add(d.engine.id)
    return out


def test_each_size_class_goes_to_its_tiers() -> None:
    assert chosen(ENGINES, 10) == {"small"}
    assert chosen(ENGINES, 16) == {"small"}
    assert chosen(ENGINES, 17) == {"small", "mid"}
    assert chosen(ENGINES, 500) == {"big"}


def test_no_engine_of_the_class_or_an_unknown_size_keeps_every_engine() -> None:
    assert chosen(ENGINES[:2], 500) == {"small", "mid"}  # the h100s are down: anyone serves
    assert chosen(ENGINES, None) == {"small", "mid", "big"}


def test_the_tier_label_comes_from_the_engine_and_can_be_another_label() -> None:
    config = CONFIG.replace("    classes:", "    label: fleet.dev/node\n    classes:")
    engines = [replace(e, node=e.tier) for e in ENGINES]
    assert chosen(engines, 10, config) == {"small"}


@pytest.mark.parametrize(
    ("classes", "where"),
    [
        ("[]", "classes"),
        ("[{values: []}]", "classes[0].values"),
        ("[{maxPromptTokens: 0, values: [l4]}]", "classes[0].maxPromptTokens"),
        ("[{maxPromptTokens: 8, values: [l4], tier: x}]", "classes[0]"),
        ("[{values: [h100]}, {maxPromptTokens: 8, values: [l4]}]", "classes[1].maxPromptTokens"),
        ("[{maxPromptTokens: 8, values: [a]}, {maxPromptTokens: 8, values: [b]}]",
         "classes[1].maxPromptTokens"),
    ],
)  # fmt: skip
def test_bad_classes_are_refused_naming_the_field(classes: str, where: str) -> None:
    config = HEADER + (
        f"plugins:\n- {{type: prompt-size-filter, parameters: {{classes: {classes}}}}}\n"
        "schedulingProfiles:\n- name: p\n  plugins: [{pluginRef: prompt-size-filter}]\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert f"plugins[prompt-size-filter].parameters.{where}" in str(info.value)
