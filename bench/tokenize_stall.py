"""Event loop while long prompts are tokenized: does the coordinator keep serving?

The coordinator tokenizes a prompt of 4,096 characters or more in a worker thread
(:class:`~fleet.coordinator.router.prompt.PromptTokenizer`), so that other requests go on
meanwhile; that only helps where the tokenizer lets go of the GIL while it works. Here a ticker
task on the trio loop sleeps 1 ms at a time and records each gap between its wake-ups, first with
nothing else running (the floor), then while ``--prompts`` completions of ``--prompt-tokens``
tokens go through ``PromptTokenizer.tokens`` one after another, as the coordinator would.
Reported: the time per prompt, and the ticker's gaps (p50, p99, max) in both phases; a loop held
by the tokenizer shows gaps as long as a prompt's tokenizing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import trio

from fleet.coordinator.router.prompt import INLINE_TOKENIZE_CHARS, PromptTokenizer

from . import report, targets
from .pick_overhead import prompt_text
from .stats import summary_ms

MODEL = "demo"
TICK_S = 0.001


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt-tokens", type=int, default=4096, help="words per prompt (about)")
    p.add_argument("--prompts", type=int, default=40)
    p.add_argument("--idle-s", type=float, default=1.0, help="the floor phase's length")


def run(args: argparse.Namespace, out: Path | None = None) -> dict[str, Any]:
    """Time both phases, write the results."""
    tokenizer = PromptTokenizer({MODEL: str(targets.demo_model())})
    body = {"model": MODEL, "prompt": prompt_text(args.prompt_tokens)}
    if len(body["prompt"]) < INLINE_TOKENIZE_CHARS:
        raise SystemExit(f"--prompt-tokens: the text must reach {INLINE_TOKENIZE_CHARS} chars")
    idle_gaps, _ = trio.run(_phase, tokenizer, body, 0, args.idle_s)
    busy_gaps, tokenize_s = trio.run(_phase, tokenizer, body, args.prompts, 0.0)
    result = {
        "prompt_tokens": args.prompt_tokens,
        "prompt_chars": len(body["prompt"]),
        "prompts": args.prompts,
        "tokenize": summary_ms(tokenize_s),
        "tick_gaps_idle": summary_ms(idle_gaps),
        "tick_gaps_tokenizing": summary_ms(busy_gaps),
    }
    md = _markdown(result)
    folder = report.write("tokenize_stall", result, md, out=out)
    print(md)
    print(f"\nwritten to {folder}")
    return result


async def _phase(
    tokenizer: PromptTokenizer, body: dict[str, Any], prompts: int, idle_s: float
) -> tuple[list[float], list[float]]:
    """The ticker's gaps while ``prompts`` prompts are tokenized (or ``idle_s`` passes), and
    each prompt's tokenizing time."""
    await tokenizer.tokens(MODEL, "completion", body)  # loaded, and the thread started
    gaps: list[float] = []
    took: list[float] = []

    async def ticker(task_status: trio.TaskStatus[None]) -> None:
        last = time.perf_counter()
        task_status.started()
        while True:
            await trio.sleep(TICK_S)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    async with trio.open_nursery() as nursery:
        await nursery.start(ticker)
        if prompts:
            for _ in range(prompts):
                started = time.perf_counter()
                tokens = await tokenizer.tokens(MODEL, "completion", body)
                took.append(time.perf_counter() - started)
                assert tokens
        else:
            await trio.sleep(idle_s)
        nursery.cancel_scope.cancel()
    return gaps, took


def _markdown(result: dict[str, Any]) -> str:
    rows = [
        ["tokenize one prompt (worker thread)", *_cells(result["tokenize"])],
        ["ticker gap, nothing else running", *_cells(result["tick_gaps_idle"])],
        ["ticker gap, prompts tokenizing", *_cells(result["tick_gaps_tokenizing"])],
    ]
    md = (
        f"### Event loop while long prompts are tokenized ({result['prompts']} prompts of "
        f"{result['prompt_chars']:,} characters, a 1 ms ticker on the loop)\n\n"
    )
    return md + report.table(["what", "p50 ms", "p99 ms", "max ms", "samples"], rows)


def _cells(summary: dict[str, Any]) -> list[object]:
    return [summary.get("p50_ms"), summary.get("p99_ms"), summary.get("max_ms"), summary["n"]]


__all__ = ["add_args", "run"]
