"""The benchmark harness's own arithmetic: percentiles, schedules, tables, result files."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleet.bench import machineprobe, report
from fleet.bench.affinity import children, pin, split_cpus
from fleet.bench.loadgen import poisson_schedule
from fleet.bench.stats import percentile, summary_ms


def test_percentile_interpolates_like_numpy_linear() -> None:
    values = [10.0, 20.0, 30.0, 40.0]
    assert percentile(values, 0) == 10
    assert percentile(values, 100) == 40
    assert percentile(values, 50) == 25
    assert percentile(values, 90) == pytest.approx(37)
    assert percentile([5.0], 99) == 5
    assert math.isnan(percentile([], 50))


def test_summary_reports_milliseconds() -> None:
    s = summary_ms([0.001, 0.002, 0.003])
    assert s["n"] == 3 and s["p50_ms"] == 2 and s["max_ms"] == 3
    assert summary_ms([]) == {"n": 0}


def test_poisson_schedule_is_seeded_and_has_the_asked_rate() -> None:
    a = poisson_schedule(20000, 100.0, seed=1)
    assert a == poisson_schedule(20000, 100.0, seed=1)
    assert a != poisson_schedule(20000, 100.0, seed=2)
    assert all(x < y for x, y in zip(a, a[1:], strict=False))
    assert len(a) / a[-1] == pytest.approx(100.0, rel=0.03)


def test_results_are_written_as_json_and_markdown(tmp_path: Path) -> None:
    md = report.table(["a", "b"], [[1, 2.5], ["x", 12345.6]])
    assert md.splitlines()[0] == "| a | b |"
    assert "| x | 12,346 |" in md
    folder = report.write("demo", {"value": 3}, md, out=tmp_path)
    data = json.loads((folder / "result.json").read_text())
    assert data["benchmark"] == "demo" and data["value"] == 3 and data["machine"]["cpus"]
    assert (folder / "result.md").read_text().startswith("| a | b |")


def test_fleet_bench_passes_everything_to_the_benchmarks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fleet.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "kv-ingest", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--blocks-per-engine" in out and "--out" in out


def test_pick_overhead_runs_small(tmp_path: Path) -> None:
    from fleet.bench.cli import main

    main(
        ["pick-overhead", "--engines", "4", "--blocks-per-engine", "64", "--prompt-tokens",
         "256", "--iterations", "20", "--out", str(tmp_path)]
    )  # fmt: skip
    result = json.loads((tmp_path / "pick_overhead" / "result.json").read_text())
    assert result["index_entries"] == 4 * 64
    assert result["schedule"]["n"] == 20 and result["schedule"]["p99_ms"] > 0
    assert result["prompt_blocks"] == 256 // 16 and result["tokenize"]["n"] == 20 // 4


def test_pd_split_runs_small_and_the_split_fleet_splits(tmp_path: Path) -> None:
    from fleet.bench.cli import main

    main(
        ["pd-split", "--engines", "2", "--prefill", "1", "--duration-s", "1.5", "--long-rates",
         "1.5", "--long-tokens", "500-700", "--long-max-tokens", "4", "--chat-rate", "2",
         "--chat-max-tokens", "8", "--out", str(tmp_path)]
    )  # fmt: skip
    result = json.loads((tmp_path / "pd_split" / "result.json").read_text())
    runs = {run["fleet"]: run for run in result["runs"]}
    assert set(runs) == {"unsplit", "split"}
    for run in runs.values():
        for cls in ("long", "chat"):
            assert run[cls]["sent"] > 0 and run[cls]["ok"] == run[cls]["sent"], run[cls]
            assert run[cls]["ttft"]["n"] == run[cls]["sent"]
    long_sent = runs["split"]["long"]["sent"]
    assert runs["split"]["long"]["split_by_header"] == long_sent  # every long prompt split
    assert runs["split"]["pd_requests_total"]["split"] == long_sent
    assert runs["split"]["chat"]["split_by_header"] == 0  # short prompts are not
    assert runs["unsplit"]["pd_requests_total"] == {"split": 0, "fallback": 0, "decode_only": 0}
    assert "| 1.5 | split | long |" in (tmp_path / "pd_split" / "result.md").read_text()


def test_proxy_overhead_rounds_cover_the_schedule_and_rotate_targets() -> None:
    from fleet.bench.proxy_overhead import added_by_round, rotated, round_slices

    schedule = poisson_schedule(10, 100.0, seed=3)
    slices = round_slices(schedule, 3)
    assert [(a, b) for a, b, _ in slices] == [(0, 3), (3, 6), (6, 10)]
    for a, b, times in slices:  # each slice keeps its gaps, from 0
        assert times[0] == 0
        assert times == pytest.approx([t - schedule[a] for t in schedule[a:b]])
    assert len(round_slices(schedule, 50)) == 10  # never an empty round
    assert len(round_slices(schedule, 0)) == 1
    names = ["direct", "fleet", "vllm-router"]
    assert [rotated(names, r)[0] for r in range(4)] == ["direct", "fleet", "vllm-router", "direct"]
    assert sorted(rotated(names, 2)) == sorted(names)
    assert added_by_round([5.0, 7.0, 6.5], [4.0, 4.5, 6.0]) == "1.00 (0.50..2.50)"
    assert added_by_round([], []) == "-"


def test_isolate_gives_the_proxies_the_last_cpu_and_refuses_one_cpu() -> None:
    assert split_cpus([0, 1]) == ({1}, {0})
    assert split_cpus([5, 2, 7]) == ({7}, {2, 5})
    with pytest.raises(SystemExit, match="two CPUs"):
        split_cpus([3])


def test_pin_reaches_every_thread_and_descendant() -> None:
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs two CPUs")
    # a child with a second thread, which starts a grandchild: all of them pinned
    code = (
        "import subprocess, sys, threading, time; "
        "threading.Thread(target=time.sleep, args=(30,), daemon=True).start(); "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
        "print('up', flush=True); time.sleep(30)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"up\n"
        (grandchild,) = children(child.pid)
        assert pin(child.pid, {allowed[0]}) == 2  # its two threads, not the grandchild
        assert os.sched_getaffinity(grandchild) == set(allowed)
        assert pin(child.pid, {allowed[-1]}, tree=True) == 3
        for pid in (child.pid, grandchild):
            for tid in os.listdir(f"/proc/{pid}/task"):
                assert os.sched_getaffinity(int(tid)) == {allowed[-1]}
    finally:
        for pid in children(child.pid):
            os.kill(pid, 9)
        child.kill()
        child.wait()


def test_machine_probe_times_the_work_warm_and_after_each_idle_wait() -> None:
    started = time.monotonic()
    p = machineprobe.probe(samples=20, idle_s=0.002)
    assert time.monotonic() - started >= 20 * 0.002  # every cold sample waited first
    assert p["warm_us"] > 0 and p["cold_us"] > 0 and p["idle_s"] == 0.002
    assert p["cold_factor"] == round(p["cold_us"] / p["warm_us"], 1)
    text = machineprobe.line(p, p)
    assert f"{p['warm_us']:.1f} us warm, {p['cold_us']:.1f} us after 2 ms idle" in text
