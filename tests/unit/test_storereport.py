"""The model store's state in heartbeats: its wire form, and when a change earns a heartbeat."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.agent.store import CachedModel, FetchProgress
from fleet.agent.storereport import ReportThrottle, store_state
from fleet.protocol.messages import CachedModelInfo, FetchInfo


def test_store_state_is_the_wire_form_of_models_and_fetches() -> None:
    models = [
        CachedModel("hf://o/a", Path("/c/a"), 100, 5.0, pinned_by=("e1",), verification="x"),
        CachedModel("s3://b/c", Path("/c/b"), 7, 9.0, pinned_by=(), verification="x"),
    ]
    fetches = [
        FetchProgress("http://h/m/", "downloading", 10, 40, 1, 3, rate_bps=5.0, eta_s=6.0),
        FetchProgress("hf://o/gone", "failed", error="404"),
    ]
    assert store_state(models, fetches) == (
        (
            CachedModelInfo("hf://o/a", 100, pinned=True, last_used=5.0),
            CachedModelInfo("s3://b/c", 7, pinned=False, last_used=9.0),
        ),
        (
            FetchInfo("http://h/m/", "downloading", 10, 40, rate_bps=5.0, eta_s=6.0),
            FetchInfo("hf://o/gone", "failed", error="404"),
        ),
    )


def test_throttle_reports_changes_at_most_once_per_interval() -> None:
    throttle = ReportThrottle(min_interval_s=0.5)
    idle = store_state([], [])
    assert not throttle.due(idle, now=0.0)  # nothing to tell
    busy = store_state([], [FetchProgress("hf://o/m", "downloading", 1, 9)])
    assert throttle.due(busy, now=0.0)
    throttle.sent(busy, now=0.0)
    later = store_state([], [FetchProgress("hf://o/m", "downloading", 5, 9)])
    assert not throttle.due(busy, now=1.0)  # unchanged
    assert not throttle.due(later, now=0.4)  # too soon
    assert throttle.due(later, now=0.5)
    throttle.sent(later, now=0.6)  # a periodic heartbeat carried it
    assert not throttle.due(later, now=5.0)


@pytest.mark.parametrize("interval", [0.0, -1.0, float("nan")])
def test_throttle_rejects_a_bad_interval(interval: float) -> None:
    with pytest.raises(ValueError, match="min_interval_s"):
        ReportThrottle(min_interval_s=interval)
