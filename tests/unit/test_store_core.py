"""The model store's sans-I/O cores with plain calls: manifest, retry backoff, LRU, progress."""

from __future__ import annotations

import json
import random

import pytest

from fleet.agent.store import FileEntry, Manifest, RetryPolicy, StoreConfig, parse_manifest
from fleet.agent.store.lru import Resident, plan_eviction
from fleet.agent.store.progress import ProgressMeter
from fleet.protocol.errors import ConfigError

SHA = "ab" * 32


def test_manifest_round_trip_and_order() -> None:
    files = [
        {"path": "b/w.safetensors", "size": 5, "sha256": SHA.upper()},
        {"path": "config.json", "size": 2},
    ]
    m = parse_manifest(json.dumps({"files": files}))
    assert [f.path for f in m.files] == ["b/w.safetensors", "config.json"]
    assert m.files[0].sha256 == SHA and m.files[0].verification == "sha256"
    assert m.files[1].verification == "size"
    assert m.total_bytes == 7 and m.is_model()
    assert parse_manifest(m.to_json()) == m


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ("[]", '"files" list'),
        ('{"files": [{"path": "../x", "size": 1}]}', "files[0]"),
        ('{"files": [{"path": "/abs", "size": 1}]}', "files[0]"),
        ('{"files": [{"path": "a//b", "size": 1}]}', "files[0]"),
        ('{"files": [{"path": "a", "size": "1"}]}', "files[0].size"),
        ('{"files": [{"path": "a", "size": -1}]}', "files[0]"),
        ('{"files": [{"path": "a", "size": 1, "sha256": "zz"}]}', "files[0]"),
        ('{"files": [{"path": "a", "size": 1}, {"path": "a", "size": 1}]}', "unique"),
        ('{"files": [{"path": "a", "size": 1}, {"path": "a/b", "size": 1}]}', "file and a folder"),
        ("not json", "not JSON"),
    ],
)
def test_manifest_rejects_bad_input(doc: str, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse_manifest(doc)


def test_manifest_without_config_is_not_a_model() -> None:
    assert not Manifest((FileEntry("weights.bin", 3),)).is_model()
    assert not Manifest((FileEntry("sub/config.json", 3),)).is_model()


def test_retry_backoff_grows_and_caps() -> None:
    policy = RetryPolicy(base_s=2.0, factor=3.0, max_s=50.0, jitter=0.0)
    assert policy.next_attempt_at(0, now=100.0) == 100.0
    assert [policy.next_attempt_at(n, now=100.0) - 100.0 for n in (1, 2, 3, 4, 10_000)] == [
        2.0,
        6.0,
        18.0,
        50.0,
        50.0,
    ]


def test_retry_jitter_only_shortens() -> None:
    policy = RetryPolicy(base_s=10.0, factor=2.0, max_s=100.0, jitter=0.5)
    rng = random.Random(7)
    delays = [policy.delay_s(2, rng) for _ in range(200)]
    assert all(10.0 <= d <= 20.0 for d in delays)
    assert max(delays) - min(delays) > 5.0


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"base_s": 0.0}, "base_s"),
        ({"factor": 0.5}, "factor"),
        ({"base_s": 5.0, "max_s": 1.0}, "max_s"),
        ({"jitter": 1.5}, "jitter"),
    ],
)
def test_retry_policy_names_the_bad_key(kwargs: dict[str, float], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        RetryPolicy(**kwargs)
    assert info.value.key == key


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"budget_bytes": -1}, "budget_bytes"),
        ({"chunk_bytes": 10}, "chunk_bytes"),
        ({"s3_endpoint_url": "localhost:9000"}, "s3_endpoint_url"),
        ({"hf_threads": 0}, "hf_threads"),
        ({"http_timeout_s": 0.0}, "http_timeout_s"),
    ],
)
def test_store_config_names_the_bad_key(kwargs: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        StoreConfig(**kwargs)  # type: ignore[arg-type]
    assert info.value.key == key


def test_lru_evicts_least_recently_used_unpinned_first() -> None:
    residents = [
        Resident("old-pinned", 40, 1.0, pinned=True),
        Resident("old", 30, 2.0),
        Resident("newer", 30, 3.0),
        Resident("newest", 30, 4.0),
    ]
    plan = plan_eviction(residents, need_bytes=60, budget_bytes=150)
    assert plan.fits and plan.evict == ("old", "newer")
    assert (plan.used_bytes, plan.freeable_bytes) == (130, 90)


def test_lru_fits_without_evicting_and_refuses_all_or_nothing() -> None:
    residents = [Resident("a", 40, 1.0, pinned=True), Resident("b", 30, 2.0)]
    assert plan_eviction(residents, need_bytes=30, budget_bytes=100).evict == ()
    plan = plan_eviction(residents, need_bytes=70, budget_bytes=100)
    assert not plan.fits and plan.evict == ()


def test_progress_rate_eta_and_resume() -> None:
    meter = ProgressMeter("hf://o/m", window_s=10.0)
    assert meter.snapshot(0.0).state == "listing"
    meter.begin(bytes_total=1000, files_total=2, now=0.0)
    meter.resumed(200)  # on disk from an earlier attempt: not part of the rate
    meter.add(100, 1.0)
    meter.add(100, 2.0)
    snap = meter.snapshot(2.0)
    assert (snap.bytes_done, snap.bytes_total) == (400, 1000)
    assert snap.rate_bps == pytest.approx(100.0)
    assert snap.eta_s == pytest.approx(6.0)
    assert "400 B/1000 B" in snap.describe() and "ETA 6 s" in snap.describe()
    for t in range(3, 30):  # the window slides: the rate follows the recent speed
        meter.add(10, float(t))
    assert meter.snapshot(29.0).rate_bps == pytest.approx(10.0, rel=0.2)
    meter.failed("boom")
    assert meter.snapshot(30.0).error == "boom"
