"""The CLI's output without a fleet: formats, colour rules, renderers, progress lines and
the parsers of agent metrics and deployment files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml

from fleet import cliout
from fleet.cliinspect import age, render_engines, render_node
from fleet.clikv import relay_counters, render_kv_stats
from fleet.cliprogress import Tracker
from fleet.deploycli import load_documents
from fleet.protocol.errors import ConfigError

ENGINES = {"engines": [
    {"id": "demo-0", "node": "n1", "model": "demo", "state": "ready", "role": "both", "pid": 7,
     "restarts": 0, "url": "http://e:1", "kind": "sim", "tier": "h100", "gpus": [0],
     "block_size": 32, "routable": True},
]}  # fmt: skip


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def text(renderable: object, stream: io.StringIO | None = None) -> str:
    stream = stream or io.StringIO()
    cliout.console(stream).print(renderable)
    return stream.getvalue()


def test_json_and_yaml_are_the_same_data() -> None:
    assert json.loads(cliout.dump(ENGINES, "json")) == ENGINES
    assert yaml.safe_load(cliout.dump(ENGINES, "yaml")) == ENGINES
    with pytest.raises(ValueError):
        cliout.dump(ENGINES, "table")


def test_colour_only_on_a_terminal_without_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert cliout.use_colour(Tty()) and not cliout.use_colour(io.StringIO())
    coloured = text(render_engines(ENGINES, False), Tty())
    assert "\x1b[32mready" in coloured
    monkeypatch.setenv("NO_COLOR", "1")
    assert not cliout.use_colour(Tty())
    assert "\x1b[" not in text(render_engines(ENGINES, False), Tty())
    plain = text(render_engines(ENGINES, True))
    assert "\x1b[" not in plain
    header = plain.splitlines()[0].split()
    assert header == ["ID", "NODE", "MODEL", "STATE", "ROLE", "PID", "RESTARTS", "URL", "KIND",
                      "TIER", "GPUS", "BLOCK", "SIZE", "ROUTABLE"]  # fmt: skip


def test_a_pipe_gets_full_width_lines() -> None:
    long = {"engines": [ENGINES["engines"][0] | {"url": "http://" + "x" * 300}]}
    assert "x" * 300 in text(render_engines(long, False))


def test_a_pipe_gets_no_trailing_spaces_and_a_terminal_its_padding() -> None:
    second = ENGINES["engines"][0] | {"id": "demo-10", "url": "http://engine:1"}
    rows = {"engines": [ENGINES["engines"][0], second]}
    piped = text(render_engines(rows, True))
    lines = piped.splitlines()
    assert len(lines) == 3 and all(line == line.rstrip() for line in lines)
    assert lines[1].endswith(" 32          yes") and lines[2].startswith("demo-10 ")
    on_tty = text(render_engines(rows, True), Tty())
    assert any(line != line.rstrip() for line in on_tty.splitlines())  # rich pads; left as is


def test_trailing_whitespace_is_held_back_until_the_line_goes_on() -> None:
    sink = io.StringIO()
    out = cliout.StripTrailing(sink)
    for part in ["a  ", "b \t", "", "\nc  \n  ", "  d", "  "]:
        out.write(part)
        out.flush()
    assert sink.getvalue() == "a  b\nc\n    d"
    out.write("\n")
    assert sink.getvalue() == "a  b\nc\n    d\n"


def test_node_inspect_puts_engines_on_their_gpus_and_flags_bad_ones() -> None:
    gpu = {"index": 0, "uuid": "GPU-1", "name": "H100", "memory_total_bytes": 80 << 30,
           "memory_used_bytes": 1 << 30, "utilization_pct": 50.0, "temperature_c": 60.0,
           "power_w": 300.0, "ecc_uncorrected": 2, "healthy": False, "xids": [79],
           "reason": "XID 79", "fake": False, "engines": ["demo-0"]}  # fmt: skip
    node = {"id": "n1", "healthy": True, "lost": False, "gpus": [gpu], "models": [],
            "fetches": [{"uri": "hf://o/m", "state": "downloading", "bytes_done": 1 << 30,
                         "bytes_total": 4 << 30, "rate_bps": 0, "eta_s": None, "error": ""}],
            "heartbeat_age_s": 1.5, "agent_url": "http://a:1", "agent_version": "1"}  # fmt: skip
    out = text(render_node({"node": node, "engines": ENGINES["engines"]}, True))
    assert "heartbeat 1.5 s ago" in out
    assert "GPU-1" in out and "1.0 GiB / 80.0 GiB" in out and "300 W" in out
    row = next(line for line in out.splitlines() if line.startswith("0 "))
    assert "79" in row.split() and "XID 79" in row and row.rstrip().endswith("demo-0")
    assert "downloading 1.0 GiB/4.0 GiB" in out
    assert [age(0.25), age(42), age(185)] == ["0.2 s", "42 s", "3m05s"]


def test_relay_counters_and_kv_stats() -> None:
    metrics = """# TYPE fleet_agent_kv_replays_total counter
fleet_agent_kv_replays_total{engine="demo-0"} 3.0
fleet_agent_kv_gaps_total{engine="demo-0"} 4.0
fleet_agent_kv_gaps_created{engine="demo-0"} 1.7e9
fleet_agent_other_total{engine="demo-0"} 9.0
"""
    assert relay_counters(metrics) == {"demo-0": {"replays": 3.0, "gaps": 4.0}}
    data = {"blocks": 5, "entries": 6, "max_entries": 10, "stats": {"gaps": 1, "resyncs": 2},
            "engines": [{"engine_id": "demo-0", "model": "demo", "blocks": 5, "events": 9,
                         "batches": 3}],
            "relay": {"demo-0": {"gaps": 4, "replays": 3, "resyncs": 0, "replayedBatches": 7}},
            "agentsUnreachable": ["n2"]}  # fmt: skip
    out = text(render_kv_stats(data, True))
    assert "5 blocks, 6/10 entries, 1 engines" in out and "replays 3" in out
    assert "demo-0  demo   5       9       3        4           3        0        7" in out
    assert "agents not reachable from here: n2" in out


def test_progress_off_a_terminal_is_a_line_per_change() -> None:
    stream = io.StringIO()
    with Tracker(cliout.console(stream)) as bars:
        bars.update("d", "demo: 0/2 ready", 0, 2)
        bars.update("d", "demo: 0/2 ready", 0, 2)
        bars.update("d", "demo: 2/2 ready", 2, 2)
    assert stream.getvalue() == "demo: 0/2 ready\ndemo: 2/2 ready\n"


def test_deploy_files_need_a_name(tmp_path: Path) -> None:
    good = tmp_path / "ok.yaml"
    good.write_text("metadata: {name: a}\n---\nmetadata: {name: b}\n")
    assert [d["metadata"]["name"] for d in load_documents(str(good))] == ["a", "b"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("metadata: {name: a}\n---\nspec: {}\n")
    with pytest.raises(ConfigError, match="document 2: metadata.name"):
        load_documents(str(bad))
    with pytest.raises(ConfigError, match="cannot be read"):
        load_documents(str(tmp_path / "missing.yaml"))
