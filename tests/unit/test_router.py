"""The scheduling pipeline (fleet.coordinator.router): config loading, filters, scorers, pickers,
prefix matching from the KV index, and what ``explain`` reports."""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from fleet.coordinator.kvindex import KVIndex
from fleet.coordinator.picker import InflightCounter
from fleet.coordinator.registry import EngineView
from fleet.coordinator.router.config import DEFAULT_CONFIG, load_config, load_config_file
from fleet.coordinator.router.enginestats import EngineStats, EngineStatsStore, parse_vllm_metrics
from fleet.coordinator.router.plugins import SessionStore, rendezvous
from fleet.coordinator.router.prompt import RoutingRequest, prompt_tokens
from fleet.coordinator.router.scheduler import Scheduler
from fleet.protocol.errors import ConfigError
from fleet.protocol.kvevents import BlockStored
from fleet.protocol.vllm_tokenizer import VllmTokenizer

BS = 4
HEADER = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"


def view(engine_id: str, *, role: str = "both", block_size: int = BS) -> EngineView:
    return EngineView(
        id=engine_id,
        node="n1",
        model="m",
        url=f"http://127.0.0.1/{engine_id}",
        pid=1,
        state="ready",
        role=role,
        kind="sim",
        restarts=0,
        block_size=block_size,
        gpus=(),
        routable=True,
    )


def store(index: KVIndex, engine_id: str, tokens: Sequence[int]) -> None:
    n = len(tokens) // BS
    event = BlockStored(
        block_hashes=tuple(hash((engine_id, i)) & 0xFFFF_FFFF for i in range(n)),
        parent_block_hash=None,
        token_ids=tuple(tokens[: n * BS]),
        block_size=BS,
        medium="GPU",
    )
    entry = index.engine(engine_id)
    index.apply(engine_id, "m", entry.next_seq if entry else 0, [event])


def scheduler(config: str = DEFAULT_CONFIG, index: KVIndex | None = None) -> Scheduler:
    return Scheduler(load_config(config), index or KVIndex(), rng=random.Random(0))


def counts(**n: int) -> InflightCounter:
    c = InflightCounter()
    for engine_id, k in n.items():
        for _ in range(k):
            c.acquire(engine_id)
    return c


PROMPT = tuple(range(100, 100 + 8 * BS))  # 8 full blocks


# -- the default pipeline -----------------------------------------------------------------------


def test_the_engine_holding_the_longest_prefix_wins() -> None:
    index = KVIndex()
    store(index, "a", PROMPT[: 2 * BS])
    store(index, "b", PROMPT[: 6 * BS])
    s = scheduler(index=index)
    d = s.schedule(RoutingRequest("m", PROMPT), [view("a"), view("b"), view("c")], counts().get, 0)
    assert d.engine is not None and d.engine.id == "b"
    assert d.prefix_tokens == 6 * BS


def test_without_a_prefix_anywhere_the_least_busy_engine_wins() -> None:
    s = scheduler()
    inflight = counts(a=3, b=1, c=2)
    picks = {
        s.schedule(RoutingRequest("m", PROMPT), [view(e) for e in "abc"], inflight.get, 0).engine
        for _ in range(20)
    }
    assert {e.id for e in picks if e} == {"b"}


def test_a_busy_prefix_holder_loses_to_an_idle_engine() -> None:
    """Hot prefixes spread: prefix weight 2 and load weight 1, but a holder much busier than an
    idle engine... is still picked while its load is within reach; past it, the idle one."""
    index = KVIndex()
    store(index, "a", PROMPT)
    s = scheduler(index=index)
    engines = [view("a"), view("b")]
    # a holds everything: 2 × 1 + 1 × (1 - 4/4) = 2; b: 0 + 1 = 1 → a.
    d = s.schedule(RoutingRequest("m", PROMPT), engines, counts(a=4).get, 0)
    assert d.engine is not None and d.engine.id == "a"
    # a holds only a quarter: 2 × 0.25 + 0 = 0.5; b idle: 1 → b.
    d = s.schedule(
        RoutingRequest("m", PROMPT[: 2 * BS] + (1,) * 6 * BS), engines, counts(a=4).get, 0
    )
    assert d.engine is not None and d.engine.id == "b" and d.prefix_tokens == 0


def test_session_affinity_keeps_a_session_on_its_engine_for_the_ttl() -> None:
    config = HEADER + (
        "plugins:\n- {type: session-affinity-scorer, parameters: {ttlSeconds: 10}}\n"
        "- {type: random-picker}\n"
        "schedulingProfiles:\n- name: p\n  plugins: [{pluginRef: session-affinity-scorer},"
        " {pluginRef: random-picker}]\n"
    )
    config = (
        config.replace("random-picker}]", "random-picker}]")
        .replace("- {type: random-picker}", "- {type: max-score-picker}")
        .replace("pluginRef: random-picker", "pluginRef: max-score-picker")
    )
    s = scheduler(config)
    engines = [view(e) for e in "abcd"]
    req = RoutingRequest("m", None, headers={"x-session-id": "s1"})
    s.served(req, "c", now=100.0)
    assert {s.schedule(req, engines, counts().get, 105.0).engine.id for _ in range(10)} == {"c"}  # type: ignore[union-attr]
    later = {s.schedule(req, engines, counts().get, 111.0).engine.id for _ in range(40)}  # type: ignore[union-attr]
    assert len(later) > 1  # expired: ties broken at random


def test_without_shared_memory_a_session_goes_to_its_engine_on_every_coordinator() -> None:
    # Several coordinators: none remembers for the others, so each scores the session's
    # rendezvous-hash engine, and two coordinators (their own tie-breaking) agree.
    config = HEADER + (
        "plugins:\n- {type: session-affinity-scorer}\n- {type: max-score-picker}\n"
        "schedulingProfiles:\n- name: p\n  plugins: [{pluginRef: session-affinity-scorer},"
        " {pluginRef: max-score-picker}]\n"
    )
    one, two = (
        Scheduler(
            load_config(config),
            KVIndex(),
            sessions=SessionStore(remember=False),
            rng=random.Random(seed),
        )
        for seed in (1, 2)
    )
    engines = [view(e) for e in "abcd"]

    def pick(s: Scheduler, session: str, among: list[EngineView]) -> str:
        req = RoutingRequest("m", None, headers={"x-session-id": session})
        engine = s.schedule(req, among, counts().get, 0.0).engine
        assert engine is not None
        s.served(req, engine.id, 0.0)
        return engine.id

    sessions = [f"s{i}" for i in range(40)]
    on_one = {s: pick(one, s, engines) for s in sessions}
    assert on_one == {s: pick(two, s, engines) for s in sessions}
    assert on_one == {s: pick(one, s, engines) for s in sessions}  # and again later
    assert set(on_one.values()) == set("abcd")  # sessions spread over the engines
    # engine b leaves: only its sessions move
    without_b = {s: pick(two, s, [e for e in engines if e.id != "b"]) for s in sessions}
    assert {s for s in sessions if without_b[s] != on_one[s]} == {
        s for s in sessions if on_one[s] == "b"
    }
    assert rendezvous("s1", []) is None


def test_filters_drop_engines_and_explain_says_which() -> None:
    config = HEADER + (
        "plugins:\n- {type: prefill-filter}\n- {type: max-score-picker}\n"
        "schedulingProfiles:\n- name: p\n  plugins: [{pluginRef: prefill-filter}]\n"
    )
    s = scheduler(config)
    engines = [view("d", role="decode"), view("p", role="prefill")]
    d = s.schedule(RoutingRequest("m", PROMPT), engines, counts().get, 0, explain=True)
    assert d.engine is not None and d.engine.id == "p"
    notes = {c["engine"]: c for c in d.candidates}
    assert notes["d"]["filters"] == {"prefill-filter": False}
    assert notes["p"]["filters"] == {"prefill-filter": True} and notes["p"]["selected"]
    only_decode = s.schedule(RoutingRequest("m", PROMPT), engines[:1], counts().get, 0)
    assert only_decode.engine is None


def test_explain_reports_each_scorer_and_the_prefix() -> None:
    index = KVIndex()
    store(index, "a", PROMPT[: 3 * BS])
    s = scheduler(index=index)
    d = s.schedule(
        RoutingRequest("m", PROMPT), [view("a"), view("b")], counts(b=1).get, 0, explain=True
    )
    a = next(c for c in d.candidates if c["engine"] == "a")
    assert a["prefix"] == {"blocks": 3, "of": 8, "tokens": 3 * BS}
    assert a["scores"]["precise-prefix-cache-scorer"] == {"score": 0.375, "weight": 2.0}
    assert a["scores"]["active-request-scorer"]["score"] == 1.0
    # prefix 2 × 0.375, recent load 1 × 1 (nothing sent yet), active 1 × 1, session 0
    assert a["total"] == pytest.approx(2 * 0.375 + 1 + 1)
    assert a["filters"] == {
        "decode-filter": True,
        "free-slot-filter": True,
        "load-imbalance-filter": True,
    }
    assert d.as_json()["selected"] == "a"


@pytest.mark.parametrize(
    ("picker", "expect_spread"),
    [("max-score-picker", False), ("random-picker", True), ("round-robin-picker", True)],
)
def test_pickers(picker: str, expect_spread: bool) -> None:
    index = KVIndex()
    store(index, "a", PROMPT)
    config = HEADER + (
        f"plugins:\n- {{type: prefix-cache-scorer}}\n- {{type: {picker}}}\n"
        "schedulingProfiles:\n- name: p\n  plugins: [{pluginRef: prefix-cache-scorer}, "
        f"{{pluginRef: {picker}}}]\n"
    )
    s = scheduler(config, index)
    engines = [view(e) for e in "abc"]
    chosen = [
        s.schedule(RoutingRequest("m", PROMPT), engines, counts().get, 0).engine.id  # type: ignore[union-attr]
        for _ in range(30)
    ]
    assert (len(set(chosen)) > 1) is expect_spread
    if picker == "round-robin-picker":
        assert chosen[:6] == ["a", "b", "c", "a", "b", "c"]


def test_metric_scorers_use_fresh_stats_and_stay_neutral_without() -> None:
    config = HEADER + (
        "plugins:\n- {type: queue-scorer}\n"
        "- {type: load-aware-scorer, parameters: {threshold: 10}}\n"
        "- {type: kv-cache-utilization-scorer}\n"
        "schedulingProfiles:\n- name: p\n  plugins: [{pluginRef: queue-scorer}, "
        "{pluginRef: load-aware-scorer}, {pluginRef: kv-cache-utilization-scorer}]\n"
    )
    stats = EngineStatsStore(staleness_s=2.0)
    s = Scheduler(load_config(config), KVIndex(), stats=stats, rng=random.Random(0))
    assert s.profile.uses_metrics and not s.profile.needs_tokens
    stats.put("a", EngineStats(waiting=8, kv_usage=0.9, at=10.0))
    stats.put("b", EngineStats(waiting=2, kv_usage=0.2, at=10.0))
    engines = [view("a"), view("b"), view("c")]
    d = s.schedule(RoutingRequest("m"), engines, counts().get, 11.0, explain=True)
    scores = {c["engine"]: c["scores"] for c in d.candidates}
    assert scores["a"]["queue-scorer"]["score"] == 0.0 and scores["b"]["queue-scorer"]["score"] == 1
    assert scores["a"]["load-aware-scorer"]["score"] == pytest.approx(0.5 * (1 - 8 / 10))
    assert scores["b"]["kv-cache-utilization-scorer"]["score"] == pytest.approx(0.8)
    assert scores["c"]["queue-scorer"]["score"] == 0.5  # never scraped: neutral
    assert d.engine is not None and d.engine.id == "b"
    stale = s.schedule(RoutingRequest("m"), engines, counts().get, 13.0, explain=True)
    assert {c["scores"]["queue-scorer"]["score"] for c in stale.candidates} == {0.5}


def test_vllm_metrics_are_parsed() -> None:
    text = (
        '# HELP x\nvllm:num_requests_waiting{engine="0",model_name="m"} 3.0\n'
        'vllm:num_requests_running{engine="0",model_name="m"} 2.0\n'
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
        'vllm:num_requests_waiting_by_reason{reason="x"} 9.0\n'
    )
    stats = parse_vllm_metrics(text, at=1.0)
    assert (stats.waiting, stats.running, stats.kv_usage, stats.at) == (3.0, 2.0, 0.25, 1.0)


def test_engines_of_other_block_sizes_are_matched_in_their_own_blocks() -> None:
    index = KVIndex()
    store(index, "a", PROMPT)
    s = scheduler(index=index)
    d = s.schedule(
        RoutingRequest("m", PROMPT),
        [view("a"), view("big", block_size=16)],
        counts().get,
        0,
        explain=True,
    )
    big = next(c for c in d.candidates if c["engine"] == "big")
    assert big["prefix"] == {"blocks": 0, "of": 2, "tokens": 0}


# -- configuration ------------------------------------------------------------------------------


def test_an_llm_d_config_with_fleets_plugins_loads_unchanged() -> None:
    """deploy/config/pd-epp-config.yaml's shape (llm-d v0.8.0), minus the P/D-only plugins."""
    text = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
featureGates: [prepareDataPlugins]
plugins:
- type: prefix-cache-scorer
  parameters: {maxPrefixBlocksToMatch: 256, lruCapacityPerServer: 31250}
- {type: queue-scorer}
- {type: decode-filter}
- {type: max-score-picker}
schedulingProfiles:
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: max-score-picker},
            {pluginRef: prefix-cache-scorer, weight: 2}, {pluginRef: queue-scorer, weight: 1}]
"""
    profile = load_config(text).primary
    assert profile.name == "decode"
    assert [f.TYPE for f in profile.filters] == ["decode-filter"]
    assert [(w.scorer.TYPE, w.weight) for w in profile.scorers] == [
        ("prefix-cache-scorer", 2.0),
        ("queue-scorer", 1.0),
    ]
    assert profile.picker.TYPE == "max-score-picker"


def test_a_profile_without_a_picker_gets_max_score() -> None:
    text = (
        HEADER
        + "plugins:\n- {type: queue-scorer}\n"
        + "schedulingProfiles:\n- name: p\n  plugins: [{pluginRef: queue-scorer}]\n"
    )
    assert load_config(text).primary.picker.TYPE == "max-score-picker"


@pytest.mark.parametrize(
    ("body", "key", "words"),
    [
        ("plugins:\n- {type: no-such}\n", "plugins[no-such].type", "unknown plugin type"),
        (
            "plugins:\n- {type: queue-scorer}\n- {type: queue-scorer}\n",
            "plugins[queue-scorer]",
            "duplicate",
        ),
        (
            "plugins:\n- {type: load-aware-scorer, parameters: {threshold: -1}}\n",
            "plugins[load-aware-scorer].parameters.threshold",
            ">= 1",
        ),
        (
            "plugins:\n- {type: load-aware-scorer, name: la, parameters: {treshold: 5}}\n",
            "plugins[la].parameters",
            "unknown parameter",
        ),
        (
            "plugins:\n- {type: queue-scorer}\nschedulingProfiles:\n- name: p1\n"
            "  plugins: [{pluginRef: nope}]\n",
            "schedulingProfiles[p1].plugins[nope]",
            "no plugin of that name",
        ),
        (
            "plugins:\n- {type: queue-scorer}\nschedulingProfiles:\n- name: p1\n"
            "  plugins: [{pluginRef: queue-scorer, weight: -2}]\n",
            "schedulingProfiles[p1].plugins[queue-scorer].weight",
            ">= 0",
        ),
        (
            "plugins:\n- {type: random-picker}\n- {type: max-score-picker}\n"
            "schedulingProfiles:\n- name: p1\n  plugins: [{pluginRef: random-picker}, "
            "{pluginRef: max-score-picker}]\n",
            "schedulingProfiles[p1].plugins[max-score-picker]",
            "second picker",
        ),
        ("plugins:\n- {type: by-label}\n", "plugins[by-label].parameters.label", "required"),
    ],
)
def test_bad_configs_are_rejected_naming_plugin_and_profile(
    body: str, key: str, words: str
) -> None:
    if "schedulingProfiles" not in body:
        body += "schedulingProfiles:\n- name: p\n  plugins: []\n"
    with pytest.raises(ConfigError) as err:
        load_config(HEADER + body)
    assert err.value.key == key
    assert words in err.value.reason


def test_wrong_api_version_kind_or_yaml_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="apiVersion"):
        load_config("apiVersion: v1\nkind: EndpointPickerConfig\n")
    with pytest.raises(ConfigError, match="kind"):
        load_config("apiVersion: llm-d.ai/v1alpha1\nkind: Pod\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config("a: [")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config_file(tmp_path / "missing.yaml")
    (tmp_path / "ok.yaml").write_text(DEFAULT_CONFIG)
    assert load_config_file(tmp_path / "ok.yaml").primary.name == "default"


def test_label_selector_filter() -> None:
    text = HEADER + (
        "plugins:\n- type: by-label-selector\n  parameters:\n"
        "    matchLabels: {fleet.dev/kind: sim}\n"
        "    matchExpressions: [{key: llm-d.ai/role, operator: NotIn, values: [prefill]}]\n"
        "schedulingProfiles:\n- name: p\n  plugins: [{pluginRef: by-label-selector}]\n"
    )
    s = scheduler(text)
    engines = [view("p", role="prefill"), view("d", role="decode")]
    d = s.schedule(RoutingRequest("m"), engines, counts().get, 0)
    assert d.engine is not None and d.engine.id == "d"


# -- tokenizing as the engine does --------------------------------------------------------------


def test_prompts_are_tokenized_like_the_engine(demo_model: Path) -> None:
    tok = VllmTokenizer(demo_model)
    messages = [{"role": "user", "content": "Hi there"}]
    chat = prompt_tokens(tok, "chat", {"messages": messages})
    text = tok.render_chat(messages)
    assert chat == tuple(tok.encode(text, add_special_tokens=False))
    assert prompt_tokens(tok, "completion", {"prompt": "Hi"}) == tuple(tok.encode("Hi"))
    assert prompt_tokens(tok, "completion", {"prompt": [5, 6, 7]}) == (5, 6, 7)
    assert prompt_tokens(tok, "completion", {"prompt": ["a", "b"]}) is None  # several prompts
    assert prompt_tokens(tok, "chat", {"messages": []}) is None  # the engine will say why


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_gives_the_tokenizers_own_ids(demo_model: Path, add_special_tokens: bool) -> None:
    """``encode`` goes through ``encode_batch_fast`` (no offsets): the same ids as the
    tokenizer's plain ``encode``, for text of every kind and length."""
    tok = VllmTokenizer(demo_model)
    special = next(iter(tok.special_tokens.values()), "")
    texts = [
        "",
        "Hi",
        " leading and trailing  spaces ",
        "ünïcödé 漢字 emoji 🙂 tabs\tand\nnewlines",
        f"{special}a special token{special} inside",
        "code() { return [1, 2, 3]; } " * 300,
    ]
    for text in texts:
        want = tok.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        assert tok.encode(text, add_special_tokens=add_special_tokens) == want, text[:40]


def test_a_hot_prefix_spreads_once_its_holder_took_more_than_its_share() -> None:
    """Two engines, one prompt group: the holder wins until its (decayed) count passes
    max(1.15 × mean, mean + 4), i.e. n > n / 2 + 4, n >= 9; then the other engine gets it too."""
    index = KVIndex()
    store(index, "a", PROMPT)
    s = scheduler(index=index)
    engines = [view("a"), view("b")]
    chosen = []
    for i in range(16):
        d = s.schedule(RoutingRequest("m", PROMPT), engines, counts().get, i / 10)
        assert d.engine is not None
        chosen.append(d.engine.id)
        s.served(RoutingRequest("m", PROMPT), d.engine.id, i / 10)
    first_b = chosen.index("b")
    assert chosen[:first_b] == ["a"] * first_b and first_b == 9


def test_a_new_prefix_goes_to_the_engine_with_the_least_recent_traffic() -> None:
    s = scheduler()
    engines = [view(e) for e in "abc"]
    for engine_id, n in (("a", 3), ("b", 1), ("c", 2)):
        for _ in range(n):
            s.served(RoutingRequest("m"), engine_id, 0.0)
    d = s.schedule(RoutingRequest("m", PROMPT), engines, counts().get, 1.0)
    assert d.engine is not None and d.engine.id == "b"


def test_decaying_counts_halve_every_half_life() -> None:
    from fleet.coordinator.router.plugins import DecayingCounts

    c = DecayingCounts(half_life_s=10)
    c.add("a", 0.0)
    c.add("a", 0.0)
    assert c.get("a", 10.0) == pytest.approx(1.0)
    assert c.get("a", 20.0) == pytest.approx(0.5)
    assert c.get("b", 5.0) == 0.0


async def test_prompt_tokenizer_loads_once_and_tokenizes_long_prompts_off_the_loop(
    demo_model: Path,
) -> None:
    from fleet.coordinator.router.prompt import INLINE_TOKENIZE_CHARS, PromptTokenizer

    tokenizers = PromptTokenizer({"m": str(demo_model), "broken": "/no/such/folder"})
    tok = await tokenizers.tokenizer("m")
    assert tok is not None and await tokenizers.tokenizer("m") is tok  # cached
    long_text = "word " * (INLINE_TOKENIZE_CHARS // 5 + 10)
    got = await tokenizers.tokens("m", "completion", {"prompt": long_text})
    assert got == tuple(tok.encode(long_text))
    short = await tokenizers.tokens("m", "chat", {"messages": [{"role": "user", "content": "x"}]})
    assert short is not None and len(short) > 1
    assert await tokenizers.tokens("broken", "completion", {"prompt": "x"}) is None
    assert await tokenizers.tokens("unknown", "completion", {"prompt": "x"}) is None


async def test_prompt_tokenizer_counts_text_long_text_in_a_worker_thread(
    demo_model: Path,
) -> None:
    """A resumed stream's generated text is counted so; thousands of tokens of it, for every
    stream of a failed engine at once, must not stall the event loop."""
    from fleet.coordinator.router.prompt import INLINE_TOKENIZE_CHARS, PromptTokenizer

    tokenizers = PromptTokenizer({"m": str(demo_model)})
    tok = await tokenizers.tokenizer("m")
    assert tok is not None
    encode, threads = tok.encode, []

    def spy(text: str, *, add_special_tokens: bool = True) -> list[int]:
        threads.append(threading.get_ident())
        return encode(text, add_special_tokens=add_special_tokens)

    tok.encode = spy  # type: ignore[method-assign]
    short, long_text = "Hello there", "word " * (INLINE_TOKENIZE_CHARS // 5 + 10)
    assert await tokenizers.count("m", short) == len(encode(short, add_special_tokens=False))
    assert await tokenizers.count("m", long_text) == len(
        encode(long_text, add_special_tokens=False)
    )
    assert threads[0] == threading.get_ident() != threads[1]
    assert await tokenizers.count("unknown", short) is None


def test_an_engine_over_the_limit_keeps_requests_that_would_lose_too_much_prefix() -> None:
    def profile(lost: int) -> str:
        return HEADER + (
            "plugins:\n- type: load-imbalance-filter\n"
            f"  parameters: {{slack: 0, maxLostPrefixTokens: {lost}}}\n"
            "- {type: precise-prefix-cache-scorer}\n"
            "schedulingProfiles:\n- name: p\n  plugins: [{pluginRef: load-imbalance-filter}, "
            "{pluginRef: precise-prefix-cache-scorer}]\n"
        )

    # b holds 2 of the prompt's 8 blocks: moving loses 6 blocks = 24 tokens
    for lost, b_holds, expect in (
        (0, 2, "b"),  # off: the limit alone decides
        (4 * BS, 2, "a"),  # 24 > 16: stays on its holder
        (7 * BS, 2, "b"),  # 24 <= 28: moves
        (4 * BS, 0, "b"),  # nobody else holds any of it: it moves, seeding the prefix on b
    ):
        index = KVIndex()
        store(index, "a", PROMPT)
        if b_holds:
            store(index, "b", PROMPT[: b_holds * BS])
        s = scheduler(profile(lost), index)
        for _ in range(3):
            s.served(RoutingRequest("m"), "a", 0.0)  # a took 3, b none: a is over the limit
        d = s.schedule(RoutingRequest("m", PROMPT), [view("a"), view("b")], counts().get, 0.0)
        assert d.engine is not None and d.engine.id == expect, (lost, b_holds)


def test_a_full_prefix_holder_loses_to_an_engine_with_a_free_slot() -> None:
    """The default pipeline: whatever it holds, an engine with its slots' worth of requests in
    flight is passed over while another has room; when every engine is full, all compete."""
    index = KVIndex()
    store(index, "a", PROMPT)
    engines = [view("a"), view("b")]
    s = Scheduler(load_config(DEFAULT_CONFIG), index, rng=random.Random(0), slots_per_engine=4)
    d = s.schedule(RoutingRequest("m", PROMPT), engines, counts(a=3, b=3).get, 0)
    assert d.engine is not None and d.engine.id == "a"  # a slot left: the prefix wins
    d = s.schedule(RoutingRequest("m", PROMPT), engines, counts(a=4, b=3).get, 0)
    assert d.engine is not None and d.engine.id == "b" and d.prefix_tokens == 0
    d = s.schedule(RoutingRequest("m", PROMPT), engines, counts(a=4, b=4).get, 0)
    assert d.engine is not None and d.engine.id == "a"
    # explain names the filter; a config's own slots win over the coordinator's
    notes = s.schedule(
        RoutingRequest("m", PROMPT), engines, counts(a=4, b=3).get, 0, explain=True
    ).candidates
    assert {n["engine"]: n["filters"]["free-slot-filter"] for n in notes} == {
        "a": False,
        "b": True,
    }
    own = HEADER + (
        "plugins:\n- {type: free-slot-filter, parameters: {slots: 8}}\n"
        "- {type: precise-prefix-cache-scorer}\n"
        "schedulingProfiles:\n- name: p\n  plugins: [{pluginRef: free-slot-filter}, "
        "{pluginRef: precise-prefix-cache-scorer}]\n"
    )
    s = Scheduler(load_config(own), index, rng=random.Random(0), slots_per_engine=4)
    d = s.schedule(RoutingRequest("m", PROMPT), engines, counts(a=7, b=0).get, 0)
    assert d.engine is not None and d.engine.id == "a"
    with pytest.raises(ConfigError, match="slots"):
        load_config(own.replace("slots: 8", "slots: 0"))


def test_scores_outside_0_to_1_are_clamped() -> None:
    from fleet.coordinator.router.pickers import MaxScorePicker
    from fleet.coordinator.router.plugins import Params, Scorer
    from fleet.coordinator.router.scheduler import Profile, WeightedScorer

    class Wild(Scorer):
        TYPE = "wild"

        def score(self, ctx, candidates):  # type: ignore[no-untyped-def]
            return {"a": 5.0, "b": 0.9, "c": -3.0}

    class Even(Scorer):
        TYPE = "even"

        def score(self, ctx, candidates):  # type: ignore[no-untyped-def]
            return {"a": 0.0, "b": 0.2, "c": 1.0}

    picker = MaxScorePicker("p", Params("p", None, MaxScorePicker.PARAMS))
    scorers = (WeightedScorer(Wild("w", Params("w", None, ())), 1.0),
               WeightedScorer(Even("e", Params("e", None, ())), 1.0))  # fmt: skip
    s = Scheduler(Profile("x", (), scorers, picker), KVIndex(), rng=random.Random(0))
    d = s.schedule(RoutingRequest("m"), [view(e) for e in "abc"], counts().get, 0, explain=True)
    # a: 1 + 0, b: 0.9 + 0.2, c: 0 + 1: b wins (unclamped, a's 5.0 would)
    assert d.engine is not None and d.engine.id == "b"
    totals = {c["engine"]: c["total"] for c in d.candidates}
    assert totals == pytest.approx({"a": 1.0, "b": 1.1, "c": 1.0})


def test_plugins_declare_the_tokens_and_metrics_they_read() -> None:
    def config(plugin: str) -> str:
        params = f", parameters: {TIERS}" if plugin == "prompt-size-filter" else ""
        return HEADER + (
            f"plugins:\n- {{type: {plugin}, name: x{params}}}\n- {{type: random-picker}}\n"
            "schedulingProfiles:\n- name: p\n"
            "  plugins: [{pluginRef: x}, {pluginRef: random-picker}]\n"
        )

    # the prompt-size filter reads the prompt's tokens with no prefix scorer beside it
    tiers = load_config(config("prompt-size-filter"))
    assert tiers.needs_tokens and not tiers.uses_metrics
    health = load_config(config("healthy-filter"))
    assert health.uses_metrics and not health.needs_tokens
    assert load_config(config("precise-prefix-cache-scorer")).needs_tokens
    assert load_config(config("queue-scorer")).uses_metrics
    plain = load_config(config("active-request-scorer"))
    assert not plain.needs_tokens and not plain.uses_metrics


TIERS = "{classes: [{maxPromptTokens: 100, values: [small]}, {values: [big]}]}"
