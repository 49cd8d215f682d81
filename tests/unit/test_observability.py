"""Fleet's metrics, Grafana dashboard and Prometheus alert rules (docs/OBSERVABILITY.md).

The rules pass ``promtool check rules`` and their ``promtool test rules`` cases; every metric the
dashboard and the rules name is one a coordinator, an agent or the node scaler registers; every
registered metric follows Prometheus' naming rules (and promtool's linter); the scheduler's
tallies count what it decided. Live scrapes go through promtool in
tests/integration/test_metrics_scrape.py.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from fleet.agent.service import Agent, AgentConfig
from fleet.coordinator.deployment import Deployment
from fleet.coordinator.kubescale import NodeScalerMetrics
from fleet.coordinator.kvindex import KVIndex
from fleet.coordinator.registry import EngineView
from fleet.coordinator.respcachestore import ResponseCacheConfig
from fleet.coordinator.router.config import DEFAULT_CONFIG, load_config
from fleet.coordinator.router.prompt import RoutingRequest
from fleet.coordinator.router.scheduler import Scheduler
from fleet.coordinator.router.tally import DURATION_BUCKETS_S, FOLD_EVERY
from fleet.coordinator.service import Coordinator, CoordinatorConfig
from fleet.protocol.kvevents import BlockStored

from ..promtool import check_metrics, exposed_names, metric_names, promtool, unknown
from .k8svalidate import model_error, schema_error

ROOT = Path(__file__).resolve().parents[2]
OBS = ROOT / "daemonset" / "observability"
DASHBOARD = OBS / "grafana-dashboard.json"
RULES = OBS / "alerts.yaml"
BASE_UNITS = ("seconds", "bytes", "celsius", "watts", "ratio", "info", "total")
NOT_BASE = re.compile(r"_(milli|micro|nano|kilo|mega|giga)?(percent|seconds|bytes)?(ms|millis|"
                      r"milliseconds|minutes|hours|kb|mb|gb|kib|mib|gib|percent)(_|$)")  # fmt: skip
HIGH_CARDINALITY = {"request_id", "session", "session_id", "prompt", "user", "ip", "trace_id"}


def _registries() -> dict[str, CollectorRegistry]:
    """The registries of a coordinator and an agent (built, not run) and the node scaler's."""
    coord = Coordinator(
        CoordinatorConfig(
            port=0,
            deployments=(Deployment(model="demo", model_path="/nowhere", replicas=1),),
            response_cache=ResponseCacheConfig("redis://127.0.0.1:9/0"),  # its metrics too
        )
    )
    agent = Agent(AgentConfig(node_id="n1", coordinator_endpoint="tcp://127.0.0.1:9", http_port=0))
    scaler = CollectorRegistry()
    NodeScalerMetrics(scaler)
    return {"coordinator": coord.metrics.registry, "agent": agent.metrics.registry,
            "node scaler": scaler}  # fmt: skip


def _known() -> set[str]:
    return set().union(
        *(exposed_names(generate_latest(r).decode()) for r in _registries().values())
    )


def _dashboard_exprs() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r}", target["expr"]))
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            out.append(
                (f"variable {var['name']}", query["query"] if isinstance(query, dict) else query)
            )
    return out


def _rule_exprs() -> list[tuple[str, str]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [(f"alert {r['alert']}", r["expr"]) for g in groups for r in g["rules"]]


# -- the rules --------------------------------------------------------------------------------


def test_the_rules_pass_promtool_check_rules() -> None:
    assert "SUCCESS" in promtool("check", "rules", str(RULES))


def test_the_alerts_fire_on_their_series_and_only_then() -> None:
    # tests/unit/alerts_test.yaml: expected alerts, labels and annotations at given times.
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yaml", cwd=Path(__file__).parent)


def test_the_prometheusrule_object_holds_the_same_groups() -> None:
    (rule,) = yaml.safe_load_all((OBS / "prometheusrule.yaml").read_text())
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_every_alert_has_a_severity_summary_and_description() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    names = [r["alert"] for g in groups for r in g["rules"]]
    assert len(names) == len(set(names))
    for g in groups:
        for r in g["rules"]:
            assert r["labels"]["severity"] in {"critical", "warning", "info"}, r["alert"]
            assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]


# -- the dashboard ----------------------------------------------------------------------------


def test_the_dashboard_is_a_grafana_dashboard_on_a_chosen_prometheus() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
    titles = " ".join(p["title"].lower() for p in board["panels"])
    for topic in ("status", "first token", "queue", "engines by state", "breaker", "kv index",
                  "prefix", "autoscal", "cost", "gpu utilization", "gpu memory",
                  "gpu temperature", "model cache"):  # fmt: skip
        assert topic in titles, topic


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_the_kustomization_ships_dashboard_and_rules_as_configmaps() -> None:
    kubectl = shutil.which("kubectl")
    assert kubectl is not None
    out = subprocess.run([kubectl, "kustomize", str(OBS)], capture_output=True, text=True,
                         timeout=60, check=True).stdout  # fmt: skip
    maps = {o["metadata"]["name"]: o for o in yaml.safe_load_all(out)}
    for obj in maps.values():  # the Kubernetes schemas and the client's models, strictly
        assert (obj["kind"], obj["metadata"]["namespace"]) == ("ConfigMap", "fleet-system")
        assert schema_error(obj) is None and model_error(obj) is None, obj["metadata"]["name"]
    board = maps["fleet-grafana-dashboard"]
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(board["data"]["fleet.json"]) == json.loads(DASHBOARD.read_text())
    rules = maps["fleet-prometheus-rules"]["data"]["fleet-alerts.yaml"]
    assert yaml.safe_load(rules) == yaml.safe_load(RULES.read_text())


# -- the metric names -------------------------------------------------------------------------


def test_the_name_reader_skips_functions_labels_ranges_and_grouping() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, model) (rate(a_seconds_bucket{model=~"$m",'
        'x="b c"}[$__rate_interval]))) / on (model) group_left (zone) b_total offset 5m '
        '> bool 0.5 and max without (gpu) (c) or vector(1e3) unless absent(d{e="f"})'
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c", "d"}
    assert metric_names('label_values(fleet_x_info{a="b"}, version)') == {"fleet_x_info"}
    assert metric_names("label_values(model)") == set()


def test_every_dashboard_and_alert_query_names_a_metric_fleet_exports() -> None:
    exprs = _dashboard_exprs() + _rule_exprs()
    known = _known()
    assert unknown(exprs, known) == []
    assert all(metric_names(e) for _, e in exprs)  # each reads at least one metric
    # The check bites: a misspelt name is reported with where it is.
    assert unknown([("panel 'x'", "rate(fleet_request_total[5m])")], known) == [
        "panel 'x': fleet_request_total"
    ]


@pytest.mark.parametrize("name", ["coordinator", "agent", "node scaler"])
def test_every_metric_follows_the_naming_rules(name: str) -> None:
    registry = _registries()[name]
    text = generate_latest(registry).decode()
    assert check_metrics(text) == ""
    for family in registry.collect():
        exposed = family.name + ("_total" if family.type == "counter" else "")
        exposed += "_info" if family.type == "info" else ""
        assert exposed.startswith("fleet_"), exposed
        assert re.fullmatch(r"[a-z][a-z0-9_]*", exposed), exposed
        assert not NOT_BASE.search(exposed), f"{exposed}: use a base unit ({BASE_UNITS})"
        if family.type != "counter":
            assert not exposed.endswith("_total"), f"{exposed} is a {family.type}"
        if family.type == "gauge":
            assert not exposed.endswith("_info"), f"{exposed}: an info metric is an Info"
        labels = {k for s in family.samples for k in s.labels} - {"le", "quantile"}
        assert not labels & HIGH_CARDINALITY, f"{exposed}: {labels & HIGH_CARDINALITY}"


def test_requests_first_bytes_and_inflight_are_read_from_plain_numbers_at_scrape() -> None:
    coord = Coordinator(
        CoordinatorConfig(port=0, deployments=(Deployment(model="demo", model_path="/nowhere"),))
    )
    metrics = coord.metrics
    for status in (200, 200, 503):
        metrics.answered("/v1/completions", "demo", status)
    for seconds in (0.01, 0.3, 100.0):  # on a bound (le is inclusive), inside, past the last
        metrics.first_byte("demo", seconds)
    coord.gateway.inflight.acquire("e1")
    text = metrics.render().decode()
    assert check_metrics(text) == ""
    assert 'fleet_requests_total{endpoint="/v1/completions",model="demo",status="200"} 2.0' in text
    assert 'fleet_requests_total{endpoint="/v1/completions",model="demo",status="503"} 1.0' in text
    ttfb = "fleet_upstream_first_byte_seconds"
    assert f'{ttfb}_bucket{{le="0.01",model="demo"}} 1.0' in text
    assert f'{ttfb}_bucket{{le="0.25",model="demo"}} 1.0' in text
    assert f'{ttfb}_bucket{{le="0.5",model="demo"}} 2.0' in text
    assert f'{ttfb}_bucket{{le="60.0",model="demo"}} 2.0' in text
    assert f'{ttfb}_bucket{{le="+Inf",model="demo"}} 3.0' in text
    assert f'{ttfb}_count{{model="demo"}} 3.0' in text
    assert f'{ttfb}_sum{{model="demo"}} 100.31' in text
    assert 'fleet_requests_inflight{engine="e1"} 1.0' in text
    coord.gateway.inflight.release("e1")  # an engine the registry does not know: gone at 0
    assert "fleet_requests_inflight{" not in metrics.render().decode()


# -- the scheduler's tallies ------------------------------------------------------------------


def _engine(engine_id: str) -> EngineView:
    return EngineView(id=engine_id, node="n1", model="m", url=f"http://{engine_id}", pid=1,
                      state="ready", role="both", kind="sim", restarts=0, block_size=4, gpus=(),
                      routable=True)  # fmt: skip


def _scheduler(index: KVIndex | None = None) -> Scheduler:
    ticks = [0.0]

    def clock() -> float:
        ticks[0] += 0.0001  # each reading 0.1 ms after the last
        return ticks[0]

    profile = load_config(DEFAULT_CONFIG, source="test")
    return Scheduler(profile, index or KVIndex(), rng=random.Random(0), clock=clock)


def _request(session: str | None = None, tokens: tuple[int, ...] | None = None) -> RoutingRequest:
    headers = {"x-session-id": session} if session else {}
    return RoutingRequest(model="m", token_ids=tokens, headers=headers)


def test_the_scheduler_counts_decisions_time_and_each_plugins_calls() -> None:
    sched = _scheduler()
    engines = [_engine("e1"), _engine("e2")]
    for _ in range(3):
        assert sched.schedule(_request(), engines, lambda _: 0, now=1.0).engine is not None
    assert sched.schedule(_request(), [], lambda _: 0, now=1.0).engine is None
    sched.schedule(_request(), engines, lambda _: 0, now=1.0, explain=True)  # not counted
    tally = sched.tally
    assert tally.decisions == {"picked": 3, "no_engine": 1}
    assert sum(tally.duration_counts) == 4
    buckets = dict(tally.cumulative_buckets())  # each run takes 0.1 ms per clock reading
    assert (buckets["0.0001"], buckets["0.0025"]) == (0, 4) and tally.duration_sum_s > 0
    assert tally.cumulative_buckets()[-1] == ("+Inf", 4)
    assert [le for le, _ in tally.cumulative_buckets()[:-1]] == [str(b) for b in DURATION_BUCKETS_S]
    plugins = {name: (t.kind, t.calls) for name, t in tally.plugins.items()}
    profile = sched.profile
    assert {p.name for p in profile.plugins()} == set(plugins)
    assert plugins[profile.picker.name] == ("picker", 4)  # explain runs are timed too
    assert all(t.seconds > 0 for t in tally.plugins.values())
    # each plugin run reads the clock once: 0.1 ms (give or take a float's last bit)
    picker = dict(tally.plugins[profile.picker.name].cumulative_buckets())
    assert (picker["5e-05"], picker["0.00025"], picker["+Inf"]) == (0, 4, 4)
    # the decision carries each plugin's time (what route explain shows)
    d = sched.schedule(_request(), engines, lambda _: 0, now=1.0)
    assert d.plugin_ms == pytest.approx({p.name: 0.1 for p in profile.plugins()})
    assert d.as_json()["plugin_ms"][profile.picker.name] == pytest.approx(0.1)


def test_plugin_times_wait_in_a_batch_and_every_read_sees_them_all() -> None:
    sched = _scheduler()
    engines = [_engine("e1"), _engine("e2")]
    picker = sched.profile.picker.name
    reads = {1: 1, FOLD_EVERY - 1: FOLD_EVERY - 2, FOLD_EVERY + 1: 2}  # decision: runs waiting
    for n in range(1, FOLD_EVERY + 2):
        sched.schedule(_request(), engines, lambda _: 0, now=1.0)
        if n in reads:
            waiting = len(sched.tally._runs)
            assert sched.tally.plugins[picker].calls == n  # a read folds what waits
            assert (waiting, len(sched.tally._runs)) == (reads[n], 0)
    for _ in range(FOLD_EVERY):  # unread: folded when FOLD_EVERY decisions wait
        sched.schedule(_request(), engines, lambda _: 0, now=1.0)
    assert sched.tally._runs == []
    assert sched.tally._plugins[picker].calls == 2 * FOLD_EVERY + 1


def test_the_scheduler_counts_session_affinity_hits_and_new_sessions() -> None:
    sched = _scheduler()
    engines = [_engine("e1"), _engine("e2")]
    first = sched.schedule(_request("s1"), engines, lambda _: 0, now=1.0).engine
    assert first is not None
    sched.served(_request("s1"), first.id, 1.0)
    again = sched.schedule(_request("s1"), engines, lambda _: 0, now=2.0).engine
    assert again is not None and again.id == first.id
    sched.schedule(_request(), engines, lambda _: 0, now=2.0)  # no session: not counted
    assert sched.tally.affinity == {"hit": 1, "miss": 0, "none": 1}


def test_the_scheduler_counts_prompt_blocks_and_those_cached_where_it_sent_them() -> None:
    index = KVIndex()
    tokens = tuple(range(16))  # 4 blocks of 4
    stored = BlockStored(block_hashes=(1, 2), parent_block_hash=None, token_ids=tokens[:8],
                         block_size=4, medium="GPU")  # fmt: skip
    index.apply("e1", "m", 0, [stored])  # e1 holds the first 2 blocks
    sched = _scheduler(index)
    chosen = sched.schedule(
        _request(tokens=tokens), [_engine("e1"), _engine("e2")], lambda _: 0, 1.0
    )
    assert chosen.engine is not None and chosen.engine.id == "e1"
    sched.schedule(_request(), [_engine("e1")], lambda _: 0, 1.0)  # no tokens: not counted
    assert (sched.tally.prompt_blocks, sched.tally.matched_blocks) == (4, 2)
