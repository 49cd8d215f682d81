"""``prompt-size-filter`` (Fleet): requests go to GPU tiers by the size of their prompt.

Configured in the EndpointPickerConfig like llm-d's filters::

    - type: prompt-size-filter
      parameters:
        label: fleet.dev/gpu-tier      # the default: the tier of the engine's GPUs
        classes:
          - maxPromptTokens: 1024      # short prompts: the cheap tier
            values: [l4]
          - values: [h100, a100]       # the rest (a class without maxPromptTokens)

A request's class is the first whose ``maxPromptTokens`` is at least its prompt's token count;
the filter keeps the engines whose label is one of the class's values. It never leaves a request
without an engine: when no candidate carries a wanted value (the tier is down, scaled to zero,
or not there), or the prompt's size is unknown, every candidate stays.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fleet.protocol.errors import ConfigError

from .plugins import Candidate, Filter, Params, SchedulingContext

TIER_LABEL = "fleet.dev/gpu-tier"


@dataclass(frozen=True)
class SizeClass:
    """Prompts of at most ``max_tokens`` (None: any size) go to engines labelled ``values``."""

    max_tokens: int | None
    values: frozenset[str]


class PromptSizeFilter(Filter):
    TYPE = "prompt-size-filter"
    NEEDS_TOKENS = True
    PARAMS = ("label", "classes")

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self.label = params.string("label", TIER_LABEL) or TIER_LABEL
        where = f"plugins[{name}].parameters.classes"
        raw = params.raw.get("classes")
        if not isinstance(raw, list) or not raw:
            raise ConfigError(where, raw, "must be a non-empty list of {maxPromptTokens, values}")
        classes: list[SizeClass] = []
        for i, item in enumerate(raw):
            at = f"{where}[{i}]"
            if not isinstance(item, Mapping) or set(item) - {"maxPromptTokens", "values"}:
                raise ConfigError(at, item, "takes maxPromptTokens and values")
            top = item.get("maxPromptTokens")
            if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
                raise ConfigError(f"{at}.maxPromptTokens", top, "must be an integer >= 1")
            values = item.get("values")
            if (
                not isinstance(values, list)
                or not values
                or not all(isinstance(v, str) and v for v in values)
            ):
                raise ConfigError(f"{at}.values", values, "must be a non-empty list of strings")
            if classes and (
                classes[-1].max_tokens is None
                or (top is not None and top <= (classes[-1].max_tokens or 0))
            ):
                raise ConfigError(
                    f"{at}.maxPromptTokens", top, "classes go by growing maxPromptTokens, the "
                    "one without it last"
                )  # fmt: skip
            classes.append(SizeClass(top, frozenset(values)))
        self.classes = tuple(classes)

    def wanted(self, prompt_tokens: int) -> frozenset[str] | None:
        """The label values a prompt of this many tokens goes to (None: no class holds it)."""
        for c in self.classes:
            if c.max_tokens is None or prompt_tokens <= c.max_tokens:
                return c.values
        return None

    def filter(self, ctx: SchedulingContext, candidates: list[Candidate]) -> list[Candidate]:
        tokens = ctx.request.token_ids
        values = self.wanted(len(tokens)) if tokens is not None else None
        if values is None:
            return candidates
        label = self.label
        fit = [c for c in candidates if c.labels.get(label) in values]
        return fit or candidates  # none of the class's tiers is up: any engine rather than none

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "label": self.label,
            "classes": [
                {"maxPromptTokens": c.max_tokens, "values": sorted(c.values)} for c in self.classes
            ],
        }


TYPES: tuple[type[Filter], ...] = (PromptSizeFilter,)

__all__ = ["TIER_LABEL", "TYPES", "PromptSizeFilter", "SizeClass"]
