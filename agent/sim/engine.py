"""The simulated engine core: a trio task that runs the scheduler step by step in (virtual) time.

:class:`SimEngine` owns the :class:`~fleet.agent.sim.scheduler.Scheduler`, the current
:class:`~fleet.agent.sim.faults.FaultState` and, optionally, the KV publisher. Its
:meth:`SimEngine.run` loop: wait for work; while the ``hang`` fault is on, wait for it to clear;
``schedule()``; sleep the step's duration; ``finish_step()``; publish the step's KV batch;
hand each produced token to its request's channel; update metrics. Time is trio's clock, so
tests with ``MockClock`` see exact step times.

HTTP handlers :meth:`SimEngine.submit` a request and read its tokens from the returned
:class:`RequestStream`; leaving early (client gone, stop string) calls :meth:`SimEngine.abort`,
which frees the request's blocks at once.

Stopping is cancellation of :meth:`run`; requests still waiting simply stop receiving tokens.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from .faults import FaultState
from .metrics import SimMetrics
from .publisher import KVEventPublisher
from .scheduler import FinishReason, Scheduler, SimRequest, StepPlan, TokenOutput

# At most this much host time between two steps is taken back from the next step's duration.
MAX_CATCH_UP_S = 0.05


@dataclass
class RequestStream:
    """The tokens of one submitted request, as they are produced.

    Attributes:
        request: the engine's record of the request (prompt, timings, cached tokens).
        tokens: receives one :class:`TokenOutput` per generated token; closed after the last.
    """

    request: SimRequest
    tokens: trio.MemoryReceiveChannel[TokenOutput]


class SimEngine:
    """The engine loop of one simulated engine.

    Args:
        scheduler: the scheduling core (owns the prefix cache).
        metrics: the engine's metrics, or None.
        publisher: the KV-event publisher (opened by the caller), or None for no events.
        faults: the faults in force at start.
        vocabulary: the token ids generated tokens are drawn from (non-empty).
        seed: seeds generation and fault draws.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        *,
        metrics: SimMetrics | None = None,
        publisher: KVEventPublisher | None = None,
        faults: FaultState | None = None,
        vocabulary: Sequence[int] = tuple(range(3, 1000)),
        seed: int = 0,
    ) -> None:
        if not vocabulary:
            raise ValueError("vocabulary must not be empty")
        self.scheduler = scheduler
        self.metrics = metrics
        self.publisher = publisher
        self._faults = faults or FaultState()
        self.vocabulary = tuple(vocabulary)
        self.seed = seed
        self.rng = random.Random(seed)
        self.steps = 0
        self._senders: dict[str, trio.MemorySendChannel[TokenOutput]] = {}
        self._wakeup = trio.Event()
        self._faults_changed = trio.Event()
        self._step_done = trio.Event()
        self._activity = trio.Event()
        self._counter = 0

    # -- faults -------------------------------------------------------------------------------

    @property
    def faults(self) -> FaultState:
        """The faults in force."""
        return self._faults

    def set_faults(self, state: FaultState) -> None:
        """Put new faults in force (a hang ends or begins between steps)."""
        self._faults = state
        self._faults_changed.set()
        self._faults_changed = trio.Event()
        self._wakeup.set()
        self._touch()

    # -- requests -----------------------------------------------------------------------------

    def submit(
        self,
        prompt: Sequence[int],
        max_tokens: int,
        *,
        request_id: str | None = None,
        sampling_seed: int | None = None,
        remote_prefill: bool = False,
        keep_block_ids: bool = False,
    ) -> RequestStream:
        """Queue a request; its tokens arrive on the returned stream.

        Args:
            prompt: prompt token ids (non-empty).
            max_tokens: tokens to generate (>= 1).
            request_id: the engine-side id (unique among live requests); generated if None.
            sampling_seed: makes the generated tokens a function of (engine seed, this seed,
                prompt): same inputs, same output, like greedy or seeded sampling in vLLM.
                None draws from the engine's random stream.
            remote_prefill: a P/D decode request: its prompt's KV is loaded, not computed.
            keep_block_ids: a P/D prefill request: its block ids are kept when it finishes.

        Returns:
            The request and the channel its tokens arrive on.
        """
        self._counter += 1
        rid = request_id or f"sim-{self._counter}"
        if sampling_seed is None:
            rng = random.Random(self.rng.getrandbits(64))
        else:
            digest = hashlib.sha256(repr((self.seed, sampling_seed, tuple(prompt))).encode())
            rng = random.Random(digest.digest())
        vocab = self.vocabulary

        def sample() -> int:
            return vocab[rng.randrange(len(vocab))]

        request = SimRequest(
            rid,
            tuple(prompt),
            max_tokens,
            trio.current_time(),
            sample,
            remote_prefill=remote_prefill,
            keep_block_ids=keep_block_ids,
        )
        send, receive = trio.open_memory_channel[TokenOutput](max_tokens + 1)
        self.scheduler.add(request)
        self._senders[rid] = send
        self._observe_state()
        self._wakeup.set()
        self._touch()
        return RequestStream(request, receive)

    def abort(self, request_id: str, reason: FinishReason = "abort") -> None:
        """Take a live request out of the engine (no-op when it already finished)."""
        send = self._senders.pop(request_id, None)
        if send is not None:
            send.close()
        if self.scheduler.get(request_id) is None:
            return
        done = self.scheduler.abort(request_id, trio.current_time(), reason)
        if self.metrics is not None:
            self.metrics.observe_finished(done)
        self._observe_state()
        self._wakeup.set()  # freed blocks may let a waiting request in
        self._touch()

    def fails_request(self) -> bool:
        """Draw whether the ``fail_fraction`` fault fails the next request."""
        return self._faults.fails_request(self.rng)

    def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache; ``AllBlocksCleared`` goes out with the next step."""
        return self.scheduler.reset_prefix_cache()

    async def wait_step(self) -> None:
        """Wait until the next step has finished (for tests and tools; not polling)."""
        await self._step_done.wait()

    async def wait_activity(self) -> None:
        """Wait for the next change: a request submitted or aborted, a step done, new faults."""
        await self._activity.wait()

    def _touch(self) -> None:
        self._activity.set()
        self._activity = trio.Event()

    # -- the loop -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run steps while there is work, until cancelled."""
        task_status.started()
        # When the modeled device finished its last step (back to back: the next one starts
        # then). The Python work between two steps (outputs, KV events, HTTP) is host CPU, which
        # a GPU overlaps with its compute: it is not added to the next step's duration, up to
        # MAX_CATCH_UP_S, so a simulated engine on a busy shared CPU keeps its modeled rate.
        device_free = -math.inf
        while True:
            while not self.scheduler.has_work or self._faults.hang:
                device_free = -math.inf  # idle: the next step starts when it is scheduled
                if self._faults.hang:
                    await self._faults_changed.wait()
                else:
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
            now = trio.current_time()
            plan = self.scheduler.schedule(now, slow_factor=self._faults.slow_factor)
            if not plan.entries:
                device_free = -math.inf
                self._publish(plan)
                if self.metrics is not None and plan.admitted:
                    self.metrics.observe_admitted(plan)
                self._wakeup = trio.Event()
                loaded = self.scheduler.next_loaded_s(now)  # a P/D request's KV arriving
                with trio.move_on_at(math.inf if loaded is None else loaded):
                    await self._wakeup.wait()
                continue
            start = now if device_free == -math.inf else max(device_free, now - MAX_CATCH_UP_S)
            device_free = start + plan.duration_s
            await trio.sleep_until(max(device_free, now))
            result = self.scheduler.finish_step(plan, trio.current_time())
            self.steps += 1
            self._publish(plan)
            for output in result.outputs:
                send = self._senders.get(output.request_id)
                if send is None:
                    continue
                send.send_nowait(output)
                if output.finish_reason is not None:
                    send.close()
                    del self._senders[output.request_id]
            if self.metrics is not None:
                self.metrics.observe_step(plan, result)
                for done in result.finished:
                    self.metrics.observe_finished(done)
            self._observe_state()
            self._step_done.set()
            self._step_done = trio.Event()
            self._touch()

    def _publish(self, plan: StepPlan) -> None:
        if self.publisher is not None and plan.events:
            self.publisher.publish(plan.events)

    def _observe_state(self) -> None:
        if self.metrics is not None:
            self.metrics.observe_state(
                running=len(self.scheduler.running),
                waiting=len(self.scheduler.waiting),
                kv_usage=self.scheduler.cache.usage,
            )


__all__ = ["RequestStream", "SimEngine"]
