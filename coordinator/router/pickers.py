"""Pickers: each chooses one engine from the scored candidates (llm-d's type names).

``max-score-picker`` (the highest weighted sum, ties at random), ``random-picker`` (uniform),
``weighted-random-picker`` (proportional to the weighted sum), ``round-robin-picker`` (Fleet: in
turn, a baseline). ``maxNumOfEndpoints`` must be 1 (Fleet sends a request to one engine).
"""

from __future__ import annotations

from collections.abc import Sequence

from .plugins import Candidate, Params, Picker, SchedulingContext


class MaxScorePicker(Picker):
    TYPE = "max-score-picker"

    def pick(self, ctx: SchedulingContext, totals: Sequence[tuple[Candidate, float]]) -> Candidate:
        best = max(t for _, t in totals)
        return ctx.rng.choice([c for c, t in totals if t >= best - 1e-12])


class RandomPicker(Picker):
    TYPE = "random-picker"

    def pick(self, ctx: SchedulingContext, totals: Sequence[tuple[Candidate, float]]) -> Candidate:
        return ctx.rng.choice([c for c, _ in totals])


class WeightedRandomPicker(Picker):
    TYPE = "weighted-random-picker"

    def pick(self, ctx: SchedulingContext, totals: Sequence[tuple[Candidate, float]]) -> Candidate:
        weights = [max(t, 0.0) for _, t in totals]
        if sum(weights) <= 0:
            return ctx.rng.choice([c for c, _ in totals])
        return ctx.rng.choices([c for c, _ in totals], weights=weights)[0]


class RoundRobinPicker(Picker):
    TYPE = "round-robin-picker"

    def __init__(self, name: str, params: Params) -> None:
        super().__init__(name, params)
        self._turn = 0

    def pick(self, ctx: SchedulingContext, totals: Sequence[tuple[Candidate, float]]) -> Candidate:
        ordered = sorted((c for c, _ in totals), key=lambda c: c.id)
        self._turn += 1
        return ordered[(self._turn - 1) % len(ordered)]


TYPES: tuple[type[Picker], ...] = (
    MaxScorePicker,
    RandomPicker,
    WeightedRandomPicker,
    RoundRobinPicker,
)

__all__ = ["TYPES"]
