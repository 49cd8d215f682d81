"""The GPUs placement sees, their free memory, and the choice of GPUs for one engine.

Sans-I/O. :class:`Node` and :class:`Gpu` are the inventory (built from the agents' NVML-shaped
readings with :meth:`Node.from_infos`); :class:`Capacity` tracks free memory per GPU while a plan
is made; :func:`choose` picks the GPUs for one engine and :func:`no_fit_reason` says exactly why
none fit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fleet.protocol.messages import GpuInfo

from .gpumemory import EngineMemory, gib

if TYPE_CHECKING:
    from .gpufit import Engine

_VENDOR_WORDS = {"nvidia", "tesla", "geforce", "quadro", "fake", "gpu"}  # "fake": --fake-gpus


def gpu_tier(name: str) -> str:
    """A GPU's tier from its NVML name: ``NVIDIA H100 80GB HBM3`` -> ``h100``, ``NVIDIA
    A100-SXM4-40GB`` -> ``a100``, ``NVIDIA GeForce RTX 4090`` -> ``rtx4090``, ``Tesla T4`` ->
    ``t4``, ``NVIDIA RTX A6000`` -> ``a6000``, ``Fake NVIDIA L4 24GiB`` -> ``l4``; ``""`` when no
    word names a model (``Fake GPU 80GiB``)."""
    words = [w for w in re.split(r"[\s_-]+", name.lower()) if w and w not in _VENDOR_WORDS]
    for i, word in enumerate(words):
        if re.fullmatch(r"[a-z]+\d+[a-z]*", word):
            return word
        if word.isalpha() and i + 1 < len(words) and re.fullmatch(r"\d+[a-z]*", words[i + 1]):
            return word + words[i + 1]
    return ""


@dataclass(frozen=True, order=True)
class GpuRef:
    """One GPU of one node."""

    node: str
    index: int

    def __str__(self) -> str:
        return f"{self.node}:{self.index}"


@dataclass(frozen=True)
class Gpu:
    """One GPU as placement sees it.

    Attributes:
        index: NVML index on its node.
        total_bytes: its memory.
        free_bytes: free memory as last read (engines running on it already subtracted).
        healthy: False after an XID/ECC event or a failed read.
        fake: a GPU the agent pretends to have (``--fake-gpus``); engines there run simulators.
        tier: its tier (:func:`gpu_tier`), matched against ``spec.gpuTier``.
        reason: why it is unhealthy.
    """

    index: int
    total_bytes: int
    free_bytes: int
    healthy: bool = True
    fake: bool = False
    tier: str = ""
    reason: str = ""


@dataclass(frozen=True)
class Node:
    """A live node and its GPUs."""

    name: str
    gpus: tuple[Gpu, ...]

    def gpu(self, index: int) -> Gpu | None:
        return next((g for g in self.gpus if g.index == index), None)

    @classmethod
    def from_infos(cls, name: str, infos: Iterable[GpuInfo], *, fake: bool = False) -> Node:
        """Build a node from its agent's readings (free = total - used, tier from the name;
        fake when ``fake`` or the reading says so)."""
        return cls(
            name,
            tuple(
                Gpu(
                    index=g.index,
                    total_bytes=g.memory_total_bytes,
                    free_bytes=max(0, g.memory_total_bytes - g.memory_used_bytes),
                    healthy=g.healthy,
                    fake=fake or g.fake,
                    tier=gpu_tier(g.name),
                    reason=g.reason,
                )
                for g in infos
            ),
        )


class Capacity:
    """Free memory per GPU while a plan is made: the reading, less the claims of engines placed
    there and not yet running, less what the plan itself places.

    Args:
        nodes: the live nodes.
        engines: every engine placed so far.
    """

    def __init__(self, nodes: Sequence[Node], engines: Iterable[Engine]) -> None:
        self.nodes = {n.name: n for n in nodes}
        self.free: dict[GpuRef, int] = {
            GpuRef(n.name, g.index): g.free_bytes for n in nodes for g in n.gpus
        }
        for e in engines:
            if not e.running:
                self.take(e)

    def take(self, engine: Engine) -> None:
        """Subtract the engine's claims from its GPUs."""
        for ref, claim in zip(engine.gpus, engine.claims, strict=True):
            if ref in self.free:
                self.free[ref] -= claim

    def healthy(self, avoid: Iterable[GpuRef] = ()) -> list[tuple[GpuRef, Gpu]]:
        """Healthy GPUs not in ``avoid``, by node and index."""
        skip = set(avoid)
        return [
            (GpuRef(n.name, g.index), g)
            for n in sorted(self.nodes.values(), key=lambda n: n.name)
            for g in sorted(n.gpus, key=lambda g: g.index)
            if g.healthy and GpuRef(n.name, g.index) not in skip
        ]


@dataclass(frozen=True)
class Choice:
    """The GPUs chosen for one engine, in rank order, and what it claims on each."""

    gpus: tuple[GpuRef, ...]
    claims: tuple[int, ...]
    fake: bool


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def choose(
    capacity: Capacity,
    tp: int,
    memory: EngineMemory,
    tiers: Sequence[str],
    avoid: Iterable[GpuRef],
    spread: Mapping[str, int],
    *,
    node_counts: Sequence[int] | None = None,
    prices: Mapping[str, float] | None = None,
) -> Choice | None:
    """Pick ``tp`` GPUs for one engine, or None when no arrangement fits.

    Candidates are groups of one tier (or, last, of mixed tiers) on ``k`` nodes with ``tp / k``
    GPUs each, each node's best-fitting GPUs; the best is the least by: real before fake,
    worst tier's rank in ``tiers`` (unlisted tiers after the listed), the GPUs' price per hour
    (``prices`` by tier; an unpriced tier costs 0), ``k``, one tier before
    mixed, engines of the deployment already on the nodes (``spread``), memory left over on the
    chosen GPUs (tightest first), node names. ``node_counts`` limits ``k`` (default: any divisor
    of ``tp``).
    """
    usable = [
        (ref, g)
        for ref, g in capacity.healthy(avoid)
        if memory.fits(g.total_bytes, capacity.free[ref])
    ]

    def rank(tier: str) -> int:
        return tiers.index(tier) if tier in tiers else len(tiers)

    price = prices or {}

    best: tuple[tuple[object, ...], Choice] | None = None
    for fake in (False, True):
        pool_all = [(ref, g) for ref, g in usable if g.fake == fake]
        tier_names = sorted({g.tier for _, g in pool_all})
        groups: list[str | None] = list(tier_names) + ([None] if len(tier_names) > 1 else [])
        for tier in groups:
            pool = [(r, g) for r, g in pool_all if tier is None or g.tier == tier]
            per_node: dict[str, list[tuple[int, GpuRef, Gpu]]] = {}
            for ref, g in pool:
                left = capacity.free[ref] - memory.claim_bytes(g.total_bytes)
                per_node.setdefault(ref.node, []).append((left, ref, g))
            for k in _divisors(tp):
                if node_counts is not None and k not in node_counts:
                    continue
                per = tp // k
                options = {n: sorted(c)[:per] for n, c in per_node.items() if len(c) >= per}
                if len(options) < k:
                    continue
                chosen = sorted(
                    options,
                    key=lambda n: (spread.get(n, 0), sum(x[0] for x in options[n]), n),
                )[:k]
                picked = [x for n in chosen for x in sorted(options[n], key=lambda x: x[1])]
                key = (
                    fake,
                    max(rank(x[2].tier) for x in picked),
                    sum(price.get(x[2].tier, 0.0) for x in picked),
                    k,
                    tier is None,
                    sum(spread.get(n, 0) for n in chosen),
                    sum(x[0] for x in picked),
                    tuple(chosen),
                )
                choice = Choice(
                    gpus=tuple(x[1] for x in picked),
                    claims=tuple(memory.claim_bytes(x[2].total_bytes) for x in picked),
                    fake=fake,
                )
                if best is None or key < best[0]:
                    best = (key, choice)
    return best[1] if best is not None else None


def no_fit_reason(
    capacity: Capacity, tp: int, memory: EngineMemory, avoid: Iterable[GpuRef] = ()
) -> str:
    """Why no GPUs fit: ``needs 2 × 38 GiB GPUs on ≤ 2 nodes; largest free: node b 1 × 80 GiB``.

    "Largest free" is the node with the most free memory on healthy GPUs (those in ``avoid``
    left out), its GPUs grouped by free memory. When some GPU has the memory the engine needs
    free but not the share of its total vLLM claims, the reason says so.
    """
    need = memory.need_bytes
    text = f"needs {tp} × {gib(need)} GPU" + (f"s on ≤ {tp} nodes" if tp > 1 else "")
    healthy = capacity.healthy(avoid)
    by_node: dict[str, list[int]] = {}
    for ref, _ in healthy:
        by_node.setdefault(ref.node, []).append(max(0, capacity.free[ref]))
    if not by_node:
        return f"{text}; largest free: none (no healthy GPU)"
    node = min(by_node, key=lambda n: (-sum(by_node[n]), n))
    counts: dict[str, int] = {}
    for free in sorted(by_node[node], reverse=True):
        counts[gib(free)] = counts.get(gib(free), 0) + 1
    text += f"; largest free: node {node} " + " + ".join(f"{c} × {s}" for s, c in counts.items())
    if any(
        memory.budget_bytes(g.total_bytes) >= need
        and need <= capacity.free[ref] < memory.claim_bytes(g.total_bytes)
        for ref, g in healthy
    ):
        text += (
            f"; vLLM claims {memory.utilization:.0%} of a GPU's total memory "
            f"(--gpu-memory-utilization {memory.utilization:g})"
        )
    return text


__all__ = [
    "Capacity",
    "Choice",
    "Gpu",
    "GpuRef",
    "Node",
    "choose",
    "gpu_tier",
    "no_fit_reason",
]
