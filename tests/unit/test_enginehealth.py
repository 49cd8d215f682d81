"""Engine health (fleet.coordinator.enginehealth): the one stall detector (probe after
``probe_after_s`` of silence, down after ``stall_s`` with a stream in flight), probes,
incarnations, as plain calls with explicit ``now`` values."""

from __future__ import annotations

from dataclasses import dataclass

from fleet.coordinator.enginehealth import EngineHealth
from fleet.coordinator.resilience import ResilienceConfig

CFG = ResilienceConfig(probe_after_s=1.0, stall_s=30.0)


@dataclass(frozen=True)
class Proc:
    id: str
    url: str
    pid: int


class Engines:
    """Requests (and streams) in flight per engine, and the engines put down."""

    def __init__(self) -> None:
        self.inflight: dict[str, int] = {}
        self.streams: dict[str, int] = {}
        self.downs: list[tuple[str, str]] = []

    def health(self, cfg: ResilienceConfig = CFG) -> EngineHealth:
        return EngineHealth(
            cfg,
            lambda e: self.inflight.get(e, 0),
            lambda e: self.streams.get(e, 0),
            lambda e, why: self.downs.append((e, why)),
        )


def test_silence_without_requests_in_flight_is_no_stall() -> None:
    engines = Engines()
    health = engines.health()
    health.heard("idle", 0.0)
    sweep = health.sweep(100.0)
    assert sweep.probe == [] and sweep.stalled == [] and engines.downs == []


def test_an_idle_engines_silence_does_not_count_once_it_gets_work() -> None:
    engines = Engines()
    health = engines.health()
    health.heard("e", 0.0)
    health.busy("e", 50.0)  # idle until now: its clock starts here
    engines.inflight["e"] = 1
    health.busy("e", 60.0)  # a second request: the clock runs on
    assert health.sweep(50.9).probe == []
    assert health.sweep(51.0).probe == ["e"]


def test_a_silent_busy_engine_is_probed_once_at_a_time_then_again_later() -> None:
    engines = Engines()
    health = engines.health()
    health.busy("e", 0.0)
    engines.inflight["e"] = 1
    assert health.sweep(0.9).probe == []
    assert health.sweep(1.0).probe == ["e"]
    assert health.sweep(1.5).probe == []  # its probe is still out
    assert not health.probed("e", True, 1.6)  # alive
    assert health.sweep(2.5).probe == []  # probed 0.9 s ago
    assert health.sweep(2.6).probe == ["e"]
    health.heard("e", 3.0)  # bytes again
    assert not health.probed("e", True, 3.0)
    assert health.sweep(3.9).probe == []


def test_a_failed_probe_with_requests_in_flight_puts_the_engine_down() -> None:
    engines = Engines()
    health = engines.health()
    health.busy("e", 0.0)
    engines.inflight["e"] = 1
    assert health.sweep(1.0).probe == ["e"]
    assert health.probed("e", False, 3.0)
    assert health.breaker("e").state == "open" and not health.breaker("e").dead
    assert engines.downs == [("e", "health probe failed with requests in flight")]
    assert health.sweep(3.5).probe == []  # its clock restarted when it went down
    # A failed probe after the requests finished, or an abandoned one, changes nothing.
    health.breakers.reset("e")
    assert health.sweep(4.0).probe == ["e"]
    engines.inflight["e"] = 0
    assert not health.probed("e", False, 4.5)
    assert not health.probed("e", None, 4.5)
    assert health.breaker("e").state == "closed"


def test_a_busy_engine_whose_probes_pass_is_still_found_stalled() -> None:
    """vLLM's /health stays 200 when its engine core hangs: passed probes do not reset the
    stall clock, only bytes do (two detectors once shared one clock, and the probes' resets
    kept the stall rule from ever firing)."""
    engines = Engines()
    health = engines.health(ResilienceConfig(probe_after_s=1.0, stall_s=5.0))
    health.busy("e", 0.0, stream=True)
    engines.inflight["e"] = engines.streams["e"] = 1
    for t in range(1, 5):
        sweep = health.sweep(float(t))
        assert sweep.stalled == [] and sweep.probe == ["e"]
        assert not health.probed("e", True, float(t))
    assert health.sweep(5.0).stalled == ["e"]
    assert health.breaker("e").state == "open"
    assert engines.downs == [("e", "stalled: requests in flight, no output")]
    assert health.sweep(5.0).stalled == []  # reported once per stall...
    assert health.sweep(9.9).stalled == []
    assert health.sweep(10.0).stalled == ["e"]  # ...and its clock restarts


def test_long_non_streamed_requests_are_never_a_stall() -> None:
    """A non-streamed answer comes whole at its end: silence is what a busy engine sends."""
    engines = Engines()
    health = engines.health(ResilienceConfig(probe_after_s=1.0, stall_s=5.0))
    health.busy("e", 0.0)
    engines.inflight["e"] = 3
    assert health.sweep(100.0).stalled == [] and engines.downs == []
    health.busy("e", 100.0, stream=True)  # a stream joins: the stall clock starts with it
    engines.inflight["e"], engines.streams["e"] = 4, 1
    assert health.sweep(104.9).stalled == []
    assert health.sweep(105.0).stalled == ["e"]


def test_down_opens_the_breaker_and_refused_marks_it_dead() -> None:
    engines = Engines()
    health = engines.health()
    health.down("a", 1.0, "stalled")
    health.down("b", 1.0, "connection refused", refused=True)
    assert health.breaker("a").state == health.breaker("b").state == "open"
    assert not health.breaker("a").dead and health.breaker("b").dead
    assert [e for e, _ in engines.downs] == ["a", "b"]


def test_a_new_process_under_an_engines_id_starts_afresh() -> None:
    health = Engines().health()
    health.incarnations([Proc("e", "http://n1:1", 10)])
    health.down("e", 1.0, "stalled")
    health.incarnations([Proc("e", "http://n1:1", 10)])  # the same process: still open
    assert health.breaker("e").state == "open"
    health.incarnations([Proc("e", "http://n2:1", 10)])  # placed again on another node
    assert health.breaker("e").state == "closed" and "e" not in health.progress


def test_forget_drops_engines_that_left() -> None:
    health = Engines().health()
    for engine_id in ("a", "b"):
        health.heard(engine_id, 0.0)
        health.breaker(engine_id).failure(0.0)
    health.incarnations([Proc("a", "u", 1), Proc("b", "u", 2)])
    health.forget({"a"})
    assert set(health.progress) == {"a"} and set(health.breakers.states()) == {"a"}
