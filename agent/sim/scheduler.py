"""Continuous batching the way vLLM 0.32's V1 scheduler does it, without the model.

Sans-I/O: :meth:`Scheduler.schedule` decides one step at ``now`` and says how long it takes
(:class:`~fleet.agent.sim.latency.LatencyModel`); the caller waits that long, then
:meth:`Scheduler.finish_step` applies the step's outcome: the tokens it produced, the requests it
finished, and the KV events it caused. What it mirrors (vllm/v1/core/sched/scheduler.py):

* **Running first.** Each running request gets the tokens it still needs (one when decoding,
  the rest of its prompt when prefilling), within a per-step token budget; a prompt longer than
  what is left of the budget is prefilled in chunks over several steps.
* **Preemption.** When a running request needs a block and none is free, the last running
  request is preempted: its blocks are released, it goes back to the *front* of the waiting
  queue and recomputes everything (prompt and output so far) when readmitted, mostly from the
  prefix cache. No new request is admitted in a step that preempted.
* **Admission.** Waiting requests are admitted in FIFO order while fewer than ``max_num_seqs``
  run, the budget lasts, and their blocks can be allocated; the head of the queue that does not
  fit blocks the rest (first come, first served). Admission looks up the prefix cache: the hit
  tokens are not computed, which is what makes a hit shorten time to first token, and they are
  counted as vLLM counts them (``prefix_cache_queries`` += prompt tokens, ``prefix_cache_hits``
  += hit tokens, first admissions only).
* **Tokens.** A request produces a token at the end of the step that computes its last token;
  it finishes with ``"length"`` once it has ``max_tokens``. The KV events of a step are those
  its allocations queued, published once the step is done (one batch per step).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from fleet.protocol.kvevents import KVEvent

from .cache import PrefixCache
from .latency import LatencyModel

RequestStatus = Literal["waiting", "running", "finished"]
FinishReason = Literal["stop", "length", "abort", "error", "repetition"]


@dataclass(eq=False)
class SimRequest:
    """One request inside the simulated engine.

    Attributes:
        request_id: unique while the request lives.
        prompt: its prompt token ids (non-empty).
        max_tokens: how many tokens to generate (>= 1).
        arrival_s: when it arrived (the clock of ``schedule``'s ``now``).
        sample: returns the next generated token id.
        tokens: prompt then output tokens so far.
        num_computed: tokens whose KV is in the cache (computed, hit or loaded).
        remote_prefill: load the prompt's KV from a remote prefill engine (a P/D decode
            request, :mod:`.kvtransfer`): the prompt tokens not hit locally are loaded on
            first admission, only the last one is computed.
        num_external_tokens: prompt tokens loaded that way (vLLM's external prefix-cache hits).
        loaded_at: when that load is done (:meth:`.LatencyModel.transfer_s` after admission);
            the request computes nothing before (vLLM's ``WAITING_FOR_REMOTE_KVS``).
        keep_block_ids: record the request's block ids when it finishes (a P/D prefill
            request, whose blocks a decode engine reads).
        block_ids: those block ids.
    """

    request_id: str
    prompt: tuple[int, ...]
    max_tokens: int
    arrival_s: float
    sample: Callable[[], int]
    tokens: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: RequestStatus = "waiting"
    num_preemptions: int = 0
    num_cached_tokens: int = 0
    scheduled_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None
    remote_prefill: bool = False
    num_external_tokens: int = 0
    loaded_at: float = -math.inf
    keep_block_ids: bool = False
    block_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("a request needs at least one prompt token")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.tokens:
            self.tokens = list(self.prompt)

    @property
    def num_output(self) -> int:
        """Tokens generated so far."""
        return len(self.tokens) - len(self.prompt)


@dataclass(frozen=True)
class StepPlan:
    """What one step computes, decided by :meth:`Scheduler.schedule`.

    Attributes:
        entries: each scheduled request with the number of tokens it computes in the step.
        duration_s: how long the step takes.
        prefill_tokens: prompt (or recomputed) tokens computed in the step.
        decode_seqs: requests decoding one token in the step.
        admitted: requests admitted from the waiting queue in this step.
        preempted: requests preempted in this step (back in the waiting queue).
        events: the KV events the step's allocations caused, to publish after the step.
    """

    entries: tuple[tuple[SimRequest, int], ...]
    duration_s: float
    prefill_tokens: int
    decode_seqs: int
    admitted: tuple[SimRequest, ...] = ()
    preempted: tuple[SimRequest, ...] = ()
    events: tuple[KVEvent, ...] = ()


@dataclass(frozen=True)
class TokenOutput:
    """A token produced for a request; ``finish_reason`` is set on its last one."""

    request_id: str
    token_id: int
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class FinishedRequest:
    """A request that left the engine, with what vLLM's request metrics need (seconds)."""

    request: SimRequest
    reason: FinishReason
    finished_s: float


@dataclass(frozen=True)
class StepResult:
    """The outcome of one step: tokens in scheduling order, then the requests that finished."""

    outputs: tuple[TokenOutput, ...]
    finished: tuple[FinishedRequest, ...]
    itl_s: tuple[float, ...]
    """Inter-token latencies of the non-first tokens produced."""


class Scheduler:
    """The scheduling core of one simulated engine.

    Args:
        cache: the engine's prefix cache.
        latency: the step-time model.
        max_num_seqs: the most requests running at once.
        max_batched_tokens: tokens computed per step at most.

    Raises:
        ValueError: a limit below 1.
    """

    def __init__(
        self,
        cache: PrefixCache,
        latency: LatencyModel,
        *,
        max_num_seqs: int,
        max_batched_tokens: int,
    ) -> None:
        if max_num_seqs < 1 or max_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_batched_tokens must be >= 1")
        self.cache = cache
        self.latency = latency
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self._ids: dict[str, SimRequest] = {}

    def next_loaded_s(self, now: float) -> float | None:
        """When the next running request still loading its KV at ``now`` is done, if any."""
        loading = [r.loaded_at for r in self.running if r.loaded_at > now]
        return min(loading) if loading else None

    @property
    def has_work(self) -> bool:
        """Whether any request waits or runs."""
        return bool(self.waiting or self.running)

    def add(self, request: SimRequest) -> None:
        """Queue a new request at the back of the waiting queue.

        Raises:
            ValueError: a live request already has this id.
        """
        if request.request_id in self._ids:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        self._ids[request.request_id] = request
        self.waiting.append(request)

    def get(self, request_id: str) -> SimRequest | None:
        """The live request with this id, if any."""
        return self._ids.get(request_id)

    def schedule(self, now: float, *, slow_factor: float = 1.0) -> StepPlan:
        """Decide the next step.

        Args:
            now: the current time (seconds, any monotonic clock).
            slow_factor: the ``slow_factor`` fault, applied to the step's duration.

        Returns:
            The step; an empty one (no entries, duration 0) when nothing can run.
        """
        budget = self.max_batched_tokens
        entries: list[tuple[SimRequest, int]] = []
        preempted: list[SimRequest] = []
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(len(request.tokens) - request.num_computed, budget)
            if num_new <= 0 or request.loaded_at > now:
                index += 1
                continue
            scheduled = True
            while not self.cache.allocate(
                request.request_id, request.tokens, request.num_computed, num_new
            ):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    scheduled = False
                    break
            if not scheduled:
                break
            entries.append((request, num_new))
            budget -= num_new
            index += 1

        admitted: list[SimRequest] = []
        while not preempted and self.waiting and budget > 0:
            if len(self.running) >= self.max_num_seqs:
                break
            request = self.waiting[0]
            hit = self.cache.lookup(request.request_id, request.tokens)
            # A P/D decode request loads its prompt's blocks (first admission only); the last
            # prompt token is computed for its logits, as vLLM does after a remote load.
            loaded = 0
            if request.remote_prefill and request.num_preemptions == 0:
                loaded = max(0, len(request.prompt) - 1 - hit)
            num_new = min(len(request.tokens) - hit - loaded, budget)
            if not self.cache.allocate(request.request_id, request.tokens, hit, loaded + num_new):
                break
            self.waiting.popleft()
            if request.num_preemptions == 0:
                request.num_cached_tokens = hit
                request.num_external_tokens = len(request.prompt) - hit if loaded else 0
                request.scheduled_s = now
            request.num_computed = hit + loaded
            request.status = "running"
            self.running.append(request)
            admitted.append(request)
            if loaded:  # its blocks arrive beside the steps; it computes once they are in
                request.loaded_at = now + self.latency.transfer_s(loaded)
                if request.loaded_at > now:
                    continue
            entries.append((request, num_new))
            budget -= num_new

        decode_seqs = sum(1 for request, n in entries if _is_decode(request, n))
        prefill_tokens = sum(n for request, n in entries if not _is_decode(request, n))
        duration = (
            self.latency.step_s(
                prefill_tokens=prefill_tokens, decode_seqs=decode_seqs, slow_factor=slow_factor
            )
            if entries
            else 0.0
        )
        return StepPlan(
            entries=tuple(entries),
            duration_s=duration,
            prefill_tokens=prefill_tokens,
            decode_seqs=decode_seqs,
            admitted=tuple(admitted),
            preempted=tuple(preempted),
            events=tuple(self.cache.take_events()),
        )

    def finish_step(self, plan: StepPlan, now: float) -> StepResult:
        """Apply a step's outcome at ``now`` (its end).

        Requests aborted while the step ran are skipped.

        Returns:
            The tokens produced and the requests finished by the step.
        """
        outputs: list[TokenOutput] = []
        finished: list[FinishedRequest] = []
        itl: list[float] = []
        for request, num_new in plan.entries:
            if request.status != "running":
                continue
            request.num_computed += num_new
            if request.num_computed < len(request.tokens):
                continue  # a prefill chunk: no token yet
            token = request.sample()
            request.tokens.append(token)
            if request.first_token_s is None:
                request.first_token_s = now
            elif request.last_token_s is not None:
                itl.append(now - request.last_token_s)
            request.last_token_s = now
            done = request.num_output >= request.max_tokens
            outputs.append(TokenOutput(request.request_id, token, "length" if done else None))
            if done:
                finished.append(self._finish(request, "length", now))
        return StepResult(tuple(outputs), tuple(finished), tuple(itl))

    def abort(self, request_id: str, now: float, reason: FinishReason = "abort") -> FinishedRequest:
        """Take a request out (client gone, stop string seen), releasing its blocks.

        Returns:
            The finished request with ``reason``.

        Raises:
            KeyError: no live request has this id.
        """
        request = self._ids[request_id]
        if request.status == "waiting":
            self.waiting.remove(request)
        elif request in self.running:
            self.running.remove(request)
        return self._finish(request, reason, now)

    def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache (fails while any request holds blocks); the
        ``AllBlocksCleared`` event goes out with the next step."""
        return self.cache.reset()

    def _preempt(self, request: SimRequest) -> None:
        self.cache.free(request.request_id)
        request.status = "waiting"
        request.num_computed = 0
        request.num_preemptions += 1
        self.waiting.appendleft(request)

    def _finish(self, request: SimRequest, reason: FinishReason, now: float) -> FinishedRequest:
        if request.status == "running" and request in self.running:
            self.running.remove(request)
        request.status = "finished"
        if request.keep_block_ids:
            request.block_ids = tuple(self.cache.block_ids(request.request_id))
        self.cache.free(request.request_id)
        self._ids.pop(request.request_id, None)
        return FinishedRequest(request, reason, now)


def _is_decode(request: SimRequest, num_new: int) -> bool:
    return (
        num_new == 1 and request.num_output > 0 and request.num_computed == len(request.tokens) - 1
    )


__all__ = [
    "FinishReason",
    "FinishedRequest",
    "Scheduler",
    "SimRequest",
    "StepPlan",
    "StepResult",
    "TokenOutput",
]
