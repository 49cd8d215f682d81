"""The prefill/decode decision (router/pd.py, Scheduler.schedule): the decode engine is picked
first by the decode profile; the decider says whether to split, from the prompt's tokens not
cached on that engine (the KV index); the prefill profile then picks among the other engines."""

from __future__ import annotations

import random

from fleet.coordinator.kvindex import KVIndex
from fleet.coordinator.picker import InflightCounter
from fleet.coordinator.registry import EngineView
from fleet.coordinator.router.config import DEFAULT_CONFIG, load_config
from fleet.coordinator.router.pd import AlwaysDisaggPDDecider, PrefixBasedPDDecider
from fleet.coordinator.router.plugins import Params
from fleet.coordinator.router.prompt import RoutingRequest
from fleet.coordinator.router.scheduler import Scheduler

from .test_router import BS, store
from .test_router import view as router_view

PROMPT = tuple(range(100, 100 + 16 * BS))  # 64 tokens, 16 full blocks


def view(engine_id: str, role: str) -> EngineView:
    return router_view(engine_id, role=role)


def pd_config(
    decider: str = "prefix-based-pd-decider", params: str = "{nonCachedTokens: 16}"
) -> str:
    return f"""\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
- type: active-request-scorer
- type: prefill-filter
- type: decode-filter
- type: {decider}
  parameters: {params}
- type: disagg-profile-handler
  parameters: {{deciders: {{prefill: {decider}}}}}
schedulingProfiles:
- name: prefill
  plugins: [{{pluginRef: prefill-filter}}, {{pluginRef: prefix-cache-scorer, weight: 2}},
            {{pluginRef: active-request-scorer}}]
- name: decode
  plugins: [{{pluginRef: decode-filter}}, {{pluginRef: prefix-cache-scorer, weight: 2}},
            {{pluginRef: active-request-scorer}}]
"""


def scheduler(text: str, index: KVIndex) -> Scheduler:
    return Scheduler(load_config(text), index, rng=random.Random(0))


ENGINES = [view("d1", "decode"), view("d2", "decode"), view("p1", "prefill"), view("p2", "prefill")]


def test_a_long_uncached_prompt_is_split_to_the_prefill_engine_holding_most() -> None:
    index = KVIndex()
    store(index, "d1", PROMPT[: 2 * BS])  # d1 holds 8 tokens: 56 not cached >= 16
    store(index, "p2", PROMPT[: 8 * BS])  # among prefill engines p2 holds the most
    d = scheduler(pd_config(), index).schedule(
        RoutingRequest("m", PROMPT), ENGINES, InflightCounter().get, 0.0
    )
    assert d.engine is not None and d.engine.id == "d1"  # decode first, by its own profile
    assert d.prefix_tokens == 8
    assert d.prefill is not None and d.prefill.id == "p2"
    assert d.pd is not None and d.pd.split
    assert (d.pd.prompt_tokens, d.pd.cached_tokens) == (64, 8)
    assert d.pd.reason == "56 non-cached tokens >= 16"


def test_a_prompt_mostly_cached_on_the_decode_engine_is_not_split() -> None:
    index = KVIndex()
    store(index, "d2", PROMPT[: 13 * BS])  # 52 cached: 12 not cached < 16
    d = scheduler(pd_config(), index).schedule(
        RoutingRequest("m", PROMPT), ENGINES, InflightCounter().get, 0.0
    )
    assert d.engine is not None and d.engine.id == "d2"
    assert d.prefill is None
    assert d.pd is not None and not d.pd.split and d.pd.reason == "12 non-cached tokens < 16"


def test_without_a_prefill_engine_the_request_is_decode_only() -> None:
    engines = [view("d1", "decode"), view("d2", "decode")]
    d = scheduler(pd_config(), KVIndex()).schedule(
        RoutingRequest("m", PROMPT), engines, InflightCounter().get, 0.0
    )
    assert d.engine is not None and d.prefill is None
    assert d.pd is not None and not d.pd.split
    assert "no prefill engine passes profile 'prefill'" in d.pd.reason


def test_an_engine_doing_both_never_prefills_for_itself() -> None:
    only = [view("b", "both")]
    d = scheduler(pd_config("always-disagg-pd-decider", "{}"), KVIndex()).schedule(
        RoutingRequest("m", PROMPT), only, InflightCounter().get, 0.0
    )
    assert d.engine is not None and d.engine.id == "b" and d.prefill is None
    both = [view("b1", "both"), view("b2", "both")]
    d = scheduler(pd_config("always-disagg-pd-decider", "{}"), KVIndex()).schedule(
        RoutingRequest("m", PROMPT), both, InflightCounter().get, 0.0
    )
    assert d.engine is not None and d.prefill is not None and d.prefill.id != d.engine.id


def test_always_splits_even_a_short_prompt_and_prefill_is_load_aware() -> None:
    inflight = InflightCounter()
    inflight.acquire("p1")
    d = scheduler(pd_config("always-disagg-pd-decider", "{}"), KVIndex()).schedule(
        RoutingRequest("m", PROMPT[:3]), ENGINES, inflight.get, 0.0
    )
    assert d.pd is not None and d.pd.split and d.pd.reason == "always"
    assert d.prefill is not None and d.prefill.id == "p2"  # p1 is busy


def test_the_deciders_plainly() -> None:
    zero = PrefixBasedPDDecider("z", Params("z", None, ("nonCachedTokens",)))
    assert not zero.decide(10_000, 0).split  # llm-d's default 0: never
    n = PrefixBasedPDDecider("n", Params("n", {"nonCachedTokens": 3}, ("nonCachedTokens",)))
    assert n.decide(10, 7).split and not n.decide(10, 8).split
    assert n.decide(None, 0).reason == "the prompt was not tokenized"
    assert AlwaysDisaggPDDecider("a", Params("a", None, ())).decide(None, 0).split


def test_an_untokenized_prompt_is_not_split_by_the_prefix_decider() -> None:
    d = scheduler(pd_config(), KVIndex()).schedule(
        RoutingRequest("m"), ENGINES, InflightCounter().get, 0.0
    )
    assert d.engine is not None and d.prefill is None
    assert d.pd is not None and not d.pd.split


def test_old_threshold_in_characters_splits_at_its_token_count() -> None:
    text = pd_config().replace(
        "- type: disagg-profile-handler\n"
        "  parameters: {deciders: {prefill: prefix-based-pd-decider}}",
        "- type: pd-profile-handler\n  parameters: {threshold: 10}",
    )
    s = scheduler(text, KVIndex())
    assert isinstance(s.config.decider, PrefixBasedPDDecider)
    split = s.schedule(RoutingRequest("m", PROMPT[:3]), ENGINES, InflightCounter().get, 0.0)
    short = s.schedule(RoutingRequest("m", PROMPT[:2]), ENGINES, InflightCounter().get, 0.0)
    assert split.pd is not None and split.pd.split  # 3 tokens >= ceil(10 / 4)
    assert short.pd is not None and not short.pd.split


def test_explain_shows_both_profiles_and_the_verdict() -> None:
    index = KVIndex()
    store(index, "p1", PROMPT[: 4 * BS])
    d = scheduler(pd_config(), index).schedule(
        RoutingRequest("m", PROMPT), ENGINES, InflightCounter().get, 0.0, explain=True
    )
    out = d.as_json()
    assert out["prefill"] == "p1"
    assert out["pd"]["split"] and out["pd"]["decider"] == "prefix-based-pd-decider"
    decode_rows = {c["engine"]: c for c in out["candidates"]}
    assert decode_rows["p1"]["filters"] == {"decode-filter": False}
    prefill_rows = {c["engine"]: c for c in out["prefill_candidates"]}
    assert d.engine is not None
    other = ({"d1", "d2"} - {d.engine.id}).pop()
    assert set(prefill_rows) == {other, "p1", "p2"}  # every engine but the decode pick
    assert prefill_rows["p1"]["selected"] and prefill_rows["p1"]["prefix"]["tokens"] == 16
    assert prefill_rows[other]["filters"] == {"prefill-filter": False}


def test_a_single_profile_config_decides_as_before() -> None:
    s = scheduler(DEFAULT_CONFIG, KVIndex())
    d = s.schedule(RoutingRequest("m", PROMPT), ENGINES, InflightCounter().get, 0.0)
    assert d.engine is not None and d.engine.id in {"d1", "d2"}
    assert d.prefill is None and d.pd is None
    assert d.as_json()["prefill"] is None and d.as_json()["pd"] is None


def test_a_decider_counting_tokens_needs_them_without_a_prefix_scorer() -> None:
    text = (
        pd_config()
        .replace("- type: prefix-cache-scorer\n", "")
        .replace(", {pluginRef: prefix-cache-scorer, weight: 2}", "")
    )
    s = scheduler(text, KVIndex())
    assert not s.profile.needs_tokens  # the decode profile alone reads no tokens
    assert s.needs_tokens  # the prefix-based decider does


def test_the_tally_counts_a_split_request_once_and_times_both_profiles_plugins() -> None:
    index = KVIndex()
    store(index, "d1", PROMPT[: 2 * BS])
    s = scheduler(pd_config(), index)
    d = s.schedule(RoutingRequest("m", PROMPT), ENGINES, InflightCounter().get, 0.0)
    assert d.prefill is not None
    tally = s.tally
    assert tally.decisions == {"picked": 1, "no_engine": 0}
    assert (tally.matched_blocks, tally.prompt_blocks) == (2, 16)  # on the decode engine
    calls = {name: t.calls for name, t in tally.plugins.items()}
    # the scorers serve both profiles: a call each; each profile's filter once
    assert calls == {
        "decode-filter": 1,
        "prefix-cache-scorer": 2,
        "active-request-scorer": 2,
        "max-score-picker": 2,
        "prefill-filter": 1,
    }
    s.schedule(RoutingRequest("m", PROMPT), ENGINES, InflightCounter().get, 0.0, explain=True)
    assert tally.decisions == {"picked": 1, "no_engine": 0}  # explain runs are not counted
