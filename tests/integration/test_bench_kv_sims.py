"""``fleet bench kv-ingest --source sims`` end to end: real simulators, a real agent relaying their
KV events, a real coordinator indexing them. Small (2 engines, 3 s of load), but every event the
agent relays must reach the coordinator, and evictions must flow too."""

from __future__ import annotations

import json
from pathlib import Path

from fleet.bench.cli import main as bench_main


def test_events_from_running_sims_reach_the_index_losslessly(tmp_path: Path) -> None:
    bench_main(
        [
            "kv-ingest",
            "--source",
            "sims",
            "--engines",
            "2",
            "--duration-s",
            "3",
            "--concurrency",
            "4",
            "--sim-num-blocks",
            "40",
            "--out",
            str(tmp_path),
        ]
    )
    result = json.loads((tmp_path / "kv_ingest_sims" / "result.json").read_text())
    assert result["requests"] > 0 and result["request_errors"] == 0
    assert result["events_relayed_by_agent"] == result["events_received_by_coordinator"] > 0
    assert result["gaps_seen_by_agent"] == 0
    assert result["stored"] > 0 and result["removed"] > 0  # 39 usable blocks: engines evict
    # The index never holds more than the engines can: 39 usable blocks each.
    assert 0 < result["index_entries"] <= 2 * 39
