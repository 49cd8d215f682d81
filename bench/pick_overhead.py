"""Picking overhead: filter + score + pick for a long prompt over many engines and a full index.

In-process and sans-I/O, to time the pipeline itself: a :class:`KVIndex` holding
``--blocks-per-engine`` blocks for each of ``--engines`` engines (1M (block, engine) entries by
default, built from vLLM-shaped BlockStored chains), Fleet's default scheduling profile, and a
prompt of ``--prompt-tokens`` tokens whose leading blocks are held by a spread of engines (engine
``i`` holds the first ``i × blocks / engines`` blocks, so every match length occurs).

Reported separately, per request, over ``--iterations`` requests:

- **tokenize**: the prompt text through the model's tokenizer (as the coordinator does);
- **schedule**: filters, scorers (including hashing the prompt's blocks into Fleet's keys and
  matching them in the index) and the picker, i.e. what ``x-scheduling-time-ms`` reports.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

from fleet.coordinator.kvindex import KVIndex
from fleet.coordinator.picker import InflightCounter
from fleet.coordinator.registry import EngineView
from fleet.coordinator.router.config import DEFAULT_CONFIG, load_config
from fleet.coordinator.router.prompt import RoutingRequest
from fleet.coordinator.router.scheduler import Scheduler
from fleet.protocol.kvevents import BlockStored

from . import report
from .stats import summary_ms

MODEL = "demo"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engines", type=int, default=64)
    p.add_argument("--blocks-per-engine", type=int, default=16384)  # 64 × 16384 ≈ 1M entries
    p.add_argument("--block-size", type=int, default=16, help="llm-d's default block size")
    p.add_argument("--prompt-tokens", type=int, default=4096)
    p.add_argument("--iterations", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace, out: Path | None = None) -> dict[str, Any]:
    """Build the index, time the pipeline, write the results."""
    rng = random.Random(args.seed)
    bs = args.block_size
    prompt = [rng.randrange(3, 1000) for _ in range(args.prompt_tokens)]
    prompt_blocks = args.prompt_tokens // bs
    t0 = time.perf_counter()
    index = KVIndex(max_entries=args.engines * args.blocks_per_engine + 1)
    for i in range(args.engines):
        _fill(index, f"e{i}", prompt, i * prompt_blocks // args.engines, args, rng)
    build_s = time.perf_counter() - t0
    engines = [_view(f"e{i}", bs) for i in range(args.engines)]
    scheduler = Scheduler(load_config(DEFAULT_CONFIG), index, rng=random.Random(args.seed))
    inflight = InflightCounter()
    for e in engines:
        for _ in range(rng.randrange(4)):
            inflight.acquire(e.id)
    text = prompt_text(args.prompt_tokens)
    tokenizer = _tokenizer()
    tokenize_s: list[float] = []
    schedule_s: list[float] = []
    chosen: dict[str, int] = {}
    for i in range(args.iterations):
        request = RoutingRequest(MODEL, tuple(prompt))
        t = time.perf_counter()
        decision = scheduler.schedule(request, engines, inflight.get, now=float(i))
        schedule_s.append(time.perf_counter() - t)
        assert decision.engine is not None
        chosen[decision.engine.id] = chosen.get(decision.engine.id, 0) + 1
        scheduler.served(request, decision.engine.id, float(i))
    for _ in range(args.iterations // 4 if tokenizer is not None else 0):
        t = time.perf_counter()
        tokenizer.encode(text)
        tokenize_s.append(time.perf_counter() - t)
    result = {
        "engines": args.engines,
        "index_entries": index.entries,
        "index_distinct_blocks": index.block_count(),
        "block_size": bs,
        "prompt_tokens": args.prompt_tokens,
        "prompt_blocks": prompt_blocks,
        "iterations": args.iterations,
        "index_build_s": round(build_s, 2),
        "schedule": summary_ms(schedule_s),
        "tokenize": summary_ms(tokenize_s),
        "distinct_engines_chosen": len(chosen),
    }
    md = _markdown(result)
    folder = report.write("pick_overhead", result, md, out=out)
    print(md)
    print(f"\nwritten to {folder}")
    return result


def _fill(
    index: KVIndex,
    engine_id: str,
    prompt: list[int],
    held: int,
    args: argparse.Namespace,
    rng: random.Random,
) -> None:
    """``held`` leading blocks of the prompt, then unrelated chains up to the engine's total."""
    bs = args.block_size
    base = int(engine_id[1:]) << 40
    seq, stored, parent = 0, 0, None
    chunk = 64
    while stored < args.blocks_per_engine:
        if stored < held:
            n = min(chunk, held - stored)
            tokens = prompt[stored * bs : (stored + n) * bs]
        else:
            n = min(chunk, args.blocks_per_engine - stored)
            tokens = [rng.randrange(3, 1000) for _ in range(n * bs)]
            parent = None  # a chain of its own
        hashes = tuple(range(base + stored, base + stored + n))
        index.apply(engine_id, MODEL, seq, [BlockStored(hashes, parent, tuple(tokens), bs)])
        parent = hashes[-1] if stored + n <= held else None
        seq += 1
        stored += n


def _view(engine_id: str, block_size: int) -> EngineView:
    return EngineView(
        id=engine_id,
        node="n",
        model=MODEL,
        url=f"http://127.0.0.1/{engine_id}",
        pid=0,
        state="ready",
        role="both",
        kind="sim",
        restarts=0,
        block_size=block_size,
        gpus=(),
        routable=True,
    )


def _tokenizer() -> Any:
    from fleet.protocol.vllm_tokenizer import VllmTokenizer

    from . import targets

    try:
        return VllmTokenizer(targets.demo_model())
    except Exception:  # the demo model needs the engine extra; report without it
        return None


def prompt_text(tokens: int) -> str:
    """``tokens`` words of routing vocabulary, the same for a given count (seeded)."""
    words = "cluster engine prefix cache token route schedule latency replica shard".split()
    rng = random.Random(1)
    return " ".join(rng.choice(words) for _ in range(tokens))


def _cols(summary: dict[str, Any]) -> list[Any]:
    return [summary.get(k, "-") for k in ("p50_ms", "p99_ms", "max_ms")] + [summary.get("n", 0)]


def _markdown(r: dict[str, Any]) -> str:
    s, t = r["schedule"], r["tokenize"]
    rows = [
        ["filter + score + pick (schedule)", *_cols(s)],
        ["tokenize the prompt text", *_cols(t)],
    ]
    head = (
        f"### Picking overhead ({r['prompt_tokens']}-token prompt = {r['prompt_blocks']} blocks "
        f"of {r['block_size']}, {r['engines']} engines, {r['index_entries']:,} indexed "
        f"(block, engine) entries, Fleet's default profile)\n\n"
    )
    return head + report.table(["step", "p50 ms", "p99 ms", "max ms", "samples"], rows)


__all__ = ["add_args", "prompt_text", "run"]
