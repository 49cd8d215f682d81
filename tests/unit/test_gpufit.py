"""GPU-memory placement (fleet.coordinator.gpufit): heterogeneous fleets, tensor-parallel groups,
priority, tiers, fake GPUs, exact no-fit reasons, and every cause of re-placement with
make-before-break. Plain calls: a small Fleet applies each plan as the coordinator would."""

from __future__ import annotations

from dataclasses import replace

from fleet.coordinator.deployspec import parse_model
from fleet.coordinator.gpuchoice import Gpu, GpuRef, Node, gpu_tier
from fleet.coordinator.gpufit import Blocked, Engine, FitConfig, Plan, Start, Stop, Want, plan
from fleet.coordinator.gpumemory import GIB, EngineMemory, engine_memory
from fleet.coordinator.modelsize import ModelFootprint
from fleet.protocol.messages import GpuInfo


def mem(need_gib: float, util: float = 0.92) -> EngineMemory:
    return EngineMemory(
        weight_bytes=int(need_gib * GIB),
        kv_bytes=0,
        activation_bytes=0,
        graph_bytes=0,
        context_bytes=0,
        utilization=util,
    )


def want(
    name: str,
    replicas: int = 1,
    *,
    tp: int = 1,
    need: float = 38,
    util: float = 0.92,
    priority: int = 0,
    tiers: tuple[str, ...] = (),
) -> Want:
    slots = tuple((f"{name}-{i}", "both") for i in range(replicas))
    return Want(name, slots, tp, mem(need, util), priority, tiers)


def gpu(
    index: int,
    total: float = 80,
    free: float | None = None,
    *,
    tier: str = "h100",
    healthy: bool = True,
    fake: bool = False,
    reason: str = "",
) -> Gpu:
    return Gpu(
        index,
        int(total * GIB),
        int((total if free is None else free) * GIB),
        healthy,
        fake,
        tier,
        reason,
    )


def node(name: str, count: int, total: float = 80, **kw: object) -> Node:
    return Node(name, tuple(gpu(i, total, **kw) for i in range(count)))  # type: ignore[arg-type]


class Fleet:
    """Nodes and engines; applies plans the way the coordinator will."""

    def __init__(self, *nodes: Node) -> None:
        self.nodes = {n.name: n for n in nodes}
        self.engines: dict[str, Engine] = {}

    def plan(self, *wants: Want, cfg: FitConfig | None = None) -> Plan:
        return plan(wants, list(self.nodes.values()), list(self.engines.values()), cfg)

    def _adjust(self, engine: Engine, sign: int) -> None:
        for ref, claim in zip(engine.gpus, engine.claims, strict=True):
            n = self.nodes.get(ref.node)
            if n is not None:
                gpus = tuple(
                    replace(g, free_bytes=g.free_bytes + sign * claim)
                    if g.index == ref.index
                    else g
                    for g in n.gpus
                )
                self.nodes[ref.node] = replace(n, gpus=gpus)

    def apply(self, p: Plan, *, ready: bool = True) -> None:
        for s in p.starts:
            self.engines[s.engine.engine_id] = replace(s.engine, running=True, ready=ready)
            self._adjust(s.engine, -1)
        for stop in p.stops:
            if stop.after is None or self.engines[stop.after].ready:
                self._adjust(self.engines.pop(stop.engine_id), +1)

    def converge(self, *wants: Want) -> None:
        for _ in range(5):
            p = self.plan(*wants)
            if not (p.starts or p.stops):
                return
            self.apply(p)
        raise AssertionError("no fixed point")

    def where(self) -> dict[str, str]:
        return {e: " ".join(str(g) for g in x.gpus) for e, x in sorted(self.engines.items())}

    def set_gpu(self, ref: str, **changes: object) -> None:
        name, index = ref.split(":")
        n = self.nodes[name]
        gpus = tuple(
            replace(g, **changes) if g.index == int(index) else g  # type: ignore[arg-type]
            for g in n.gpus
        )
        self.nodes[name] = replace(n, gpus=gpus)

    def mark_ready(self, engine_id: str) -> None:
        self.engines[engine_id] = replace(self.engines[engine_id], ready=True)


def test_heterogeneous_fleet_fits_by_memory_and_spreads_replicas() -> None:
    fleet = Fleet(node("a", 4), node("b", 2, 24, tier="l4"))
    big, small = want("big", 2, need=60), want("small", 2, need=10, util=0.9)
    p = fleet.plan(big, small)
    assert p.blocked == ()
    assert [(s.engine.engine_id, s.reason, s.replaces) for s in p.starts] == [
        ("big-0", "new replica", None),
        ("big-1", "new replica", None),
        ("small-0", "new replica", None),
        ("small-1", "new replica", None),
    ]
    fleet.apply(p)
    # big only fits the 80 GiB GPUs; small takes the tightest fit (an L4), then the other node.
    assert fleet.where() == {"big-0": "a:0", "big-1": "a:1", "small-0": "b:0", "small-1": "a:2"}
    assert fleet.engines["small-0"].claims == (int(24 * GIB * 0.9) + 1,)
    assert fleet.plan(big, small) == Plan()  # nothing changed, nothing to do


def test_replicas_spread_across_nodes() -> None:
    fleet = Fleet(node("a", 2), node("b", 2), node("c", 2))
    fleet.converge(want("m", 3, need=10, util=0.3))  # three would fit on one GPU each... node
    assert sorted(v.split(":")[0] for v in fleet.where().values()) == ["a", "b", "c"]


def test_tensor_parallel_group_prefers_one_node() -> None:
    fleet = Fleet(Node("a", (gpu(0), gpu(1, free=0))), node("b", 2), node("c", 1))
    fleet.converge(want("tp", tp=2, need=30))
    assert fleet.where() == {"tp-0": "b:0 b:1"}
    assert fleet.engines["tp-0"].nodes == ("b",)


def test_tensor_parallel_group_spans_the_fewest_nodes_with_equal_counts() -> None:
    fleet = Fleet(node("a", 1), node("b", 1), node("c", 1))
    fleet.converge(want("tp2", tp=2, need=30))
    assert fleet.where() == {"tp2-0": "a:0 b:0"}

    fleet = Fleet(node("a", 2), node("b", 3), node("c", 1), node("d", 2))
    fleet.converge(want("tp4", tp=4, need=30))
    assert fleet.where() == {"tp4-0": "a:0 a:1 b:0 b:1"}  # 2 + 2, never 3 + 1
    assert fleet.engines["tp4-0"].nodes == ("a", "b")

    fleet = Fleet(node("a", 3), node("b", 1))
    assert fleet.plan(want("tp4", tp=4, need=30)).blocked == (
        Blocked(
            "tp4", "tp4-0", "needs 4 × 30 GiB GPUs on ≤ 4 nodes; largest free: node a 3 × 80 GiB"
        ),
    )


def test_higher_priority_places_first() -> None:
    fleet = Fleet(node("a", 1))
    p = fleet.plan(want("alpha"), want("zeta", priority=100))
    assert [s.engine.engine_id for s in p.starts] == ["zeta-0"]
    assert p.blocked == (
        Blocked("alpha", "alpha-0", "needs 1 × 38 GiB GPU; largest free: node a 1 × 6.4 GiB"),
    )


def test_no_fit_reasons() -> None:
    fleet = Fleet(node("a", 2, 24, tier="l4"), node("b", 1))
    assert fleet.plan(want("m", tp=2)).blocked[0].reason == (
        "needs 2 × 38 GiB GPUs on ≤ 2 nodes; largest free: node b 1 × 80 GiB"
    )
    fleet = Fleet(Node("a", (gpu(0, free=60), gpu(1, free=20), gpu(2, free=20))))
    assert fleet.plan(want("m")).blocked[0].reason == (
        "needs 1 × 38 GiB GPU; largest free: node a 1 × 60 GiB + 2 × 20 GiB; vLLM claims 92% of "
        "a GPU's total memory (--gpu-memory-utilization 0.92)"
    )
    fleet = Fleet(Node("a", (gpu(0, healthy=False),)))
    assert fleet.plan(want("m")).blocked[0].reason == (
        "needs 1 × 38 GiB GPU; largest free: none (no healthy GPU)"
    )
    assert Fleet().plan(want("m", 2)).blocked == (
        Blocked("m", "m-0", "needs 1 × 38 GiB GPU; largest free: none (no healthy GPU)"),
        Blocked("m", "m-1", "needs 1 × 38 GiB GPU; largest free: none (no healthy GPU)"),
    )


def test_gpu_tier_preference_is_honoured_where_possible() -> None:
    fleet = Fleet(node("a", 1, tier="a100"), node("b", 1, tier="h100"), node("c", 1, tier="l40s"))
    fleet.converge(want("m", 3, tiers=("h100", "a100")))
    assert fleet.where() == {"m-0": "b:0", "m-1": "a:0", "m-2": "c:0"}


def test_real_gpus_before_fake_ones() -> None:
    fleet = Fleet(node("fake", 2, fake=True), node("real", 1, tier="a100"))
    p = fleet.plan(want("m", 2))
    assert [(s.engine.engine_id, str(s.engine.gpus[0]), s.fake) for s in p.starts] == [
        ("m-0", "real:0", False),
        ("m-1", "fake:0", True),
    ]
    # A group never mixes fake and real GPUs: tp=2 fits only the fake node.
    assert [
        str(g)
        for g in Fleet(node("fake", 2, fake=True), node("real", 1))
        .plan(want("t", tp=2))
        .starts[0]
        .engine.gpus
    ] == ["fake:0", "fake:1"]


def test_pending_engines_hold_their_claim() -> None:
    fleet = Fleet(node("a", 1))
    fleet.engines["x-0"] = Engine(
        "x-0", "x", "x-0", "both", (GpuRef("a", 0),), (int(73.6 * GIB),), running=False
    )
    assert fleet.plan(want("x"), want("y")).blocked == (
        Blocked("y", "y-0", "needs 1 × 38 GiB GPU; largest free: node a 1 × 6.4 GiB"),
    )


def test_node_lost_re_places_its_engines() -> None:
    fleet = Fleet(node("a", 1), node("b", 1))
    m = want("m")
    fleet.converge(m)
    assert fleet.where() == {"m-0": "a:0"}
    del fleet.nodes["a"]
    p = fleet.plan(m)
    assert p.stops == (Stop("m-0", "node a lost"),)
    assert [
        (s.engine.engine_id, str(s.engine.gpus[0]), s.reason, s.replaces) for s in p.starts
    ] == [("m-0-g1", "b:0", "node a lost", "m-0")]
    fleet.apply(p)
    assert fleet.where() == {"m-0-g1": "b:0"}
    del fleet.nodes["b"]
    assert fleet.plan(m) == Plan(
        stops=(Stop("m-0-g1", "node b lost"),),
        blocked=(
            Blocked(
                "m",
                "m-0",
                "cannot move m-0-g1 (node b lost): needs 1 × 38 GiB GPU; "
                "largest free: none (no healthy GPU)",
            ),
        ),
    )


def test_unhealthy_gpu_moves_only_its_engine_make_before_break() -> None:
    fleet = Fleet(node("a", 2), node("b", 1))
    m2, n = want("m", 2), want("n")
    fleet.converge(m2, n)
    assert fleet.where() == {"m-0": "a:0", "m-1": "b:0", "n-0": "a:1"}
    fleet.nodes["c"] = node("c", 1)
    fleet.set_gpu("a:0", healthy=False, reason="xid 79")
    p = fleet.plan(m2, n)
    assert [(s.engine.engine_id, str(s.engine.gpus[0]), s.replaces) for s in p.starts] == [
        ("m-0-g1", "c:0", "m-0"),
    ]
    assert p.stops == (Stop("m-0", "moved: GPU a:0 unhealthy: xid 79", after="m-0-g1"),)
    fleet.apply(p, ready=False)  # the new copy is starting: the old one keeps serving
    assert fleet.where() == {"m-0": "a:0", "m-0-g1": "c:0", "m-1": "b:0", "n-0": "a:1"}
    assert fleet.plan(m2, n) == Plan(
        stops=(Stop("m-0", "moved: GPU a:0 unhealthy: xid 79", after="m-0-g1"),)
    )
    fleet.mark_ready("m-0-g1")
    p = fleet.plan(m2, n)
    assert p == Plan(stops=(Stop("m-0", "moved: GPU a:0 unhealthy: xid 79"),))
    fleet.apply(p)
    assert fleet.where() == {"m-0-g1": "c:0", "m-1": "b:0", "n-0": "a:1"}  # n-0 never moved
    assert fleet.plan(m2, n) == Plan()


def test_unhealthy_gpu_without_room_keeps_the_engine_and_says_why() -> None:
    fleet = Fleet(node("a", 1))
    fleet.converge(want("m"))
    fleet.set_gpu("a:0", healthy=False, reason="double-bit ecc error")
    assert fleet.plan(want("m")) == Plan(
        blocked=(
            Blocked(
                "m",
                "m-0",
                "cannot move m-0 (GPU a:0 unhealthy: double-bit ecc error): needs 1 × 38 GiB "
                "GPU; largest free: none (no healthy GPU)",
            ),
        )
    )


def test_a_gpu_that_vanished_from_the_readings_counts_as_unhealthy() -> None:
    fleet = Fleet(node("a", 2))
    fleet.converge(want("m"))
    fleet.nodes["a"] = Node("a", (fleet.nodes["a"].gpus[1],))
    p = fleet.plan(want("m"))
    assert [str(s.engine.gpus[0]) for s in p.starts] == ["a:1"]
    assert p.stops == (Stop("m-0", "moved: GPU a:0 gone", after="m-0-g1"),)


def test_crash_looping_engine_moves_off_its_gpus() -> None:
    cfg = FitConfig(crash_loop_restarts=3)
    fleet = Fleet(node("a", 2))
    fleet.converge(want("m"))
    fleet.engines["m-0"] = replace(fleet.engines["m-0"], restarts=2, ready=False)
    assert fleet.plan(want("m"), cfg=cfg) == Plan()  # below the limit: it may still recover
    fleet.engines["m-0"] = replace(fleet.engines["m-0"], restarts=3)
    p = fleet.plan(want("m"), cfg=cfg)
    assert [(s.engine.engine_id, str(s.engine.gpus[0]), s.reason) for s in p.starts] == [
        ("m-0-g1", "a:1", "crash-looping: 3 restarts (limit 3)"),
    ]
    assert p.stops == (Stop("m-0", "moved: crash-looping: 3 restarts (limit 3)"),)  # not ready


def test_healthy_engines_never_move_without_cause() -> None:
    fleet = Fleet(node("a", 1, 40, tier="a100"), node("b", 1, 40, tier="a100"))
    m = want("m", 2, need=20, tiers=("h100",))
    fleet.converge(m)
    before = fleet.where()
    fleet.nodes["c"] = node("c", 4)  # a better, preferred tier arrives: nothing moves
    assert fleet.plan(m) == Plan()
    assert fleet.where() == before


def test_scale_down_removal_and_surplus_copies() -> None:
    fleet = Fleet(node("a", 4))
    fleet.converge(want("m", 3, need=10, util=0.2), want("gone", need=10, util=0.2))
    p = fleet.plan(want("m", 1, need=10, util=0.2))
    assert p == Plan(
        stops=(
            Stop("gone-0", "deployment gone removed"),
            Stop("m-1", "deployment m scaled down"),
            Stop("m-2", "deployment m scaled down"),
        )
    )
    fleet.apply(p)
    extra = replace(fleet.engines["m-0"], engine_id="m-0-g1", generation=1, ready=False)
    fleet.engines["m-0-g1"] = extra  # e.g. a GPU came back healthy while the move was under way
    assert fleet.plan(want("m", 1, need=10, util=0.2)) == Plan(
        stops=(Stop("m-0-g1", "surplus copy of m-0"),)
    )


def test_want_of_a_fleet_model() -> None:
    model = parse_model(
        {
            "apiVersion": "fleet.dev/v1alpha1",
            "kind": "FleetModel",
            "metadata": {"name": "chat"},
            "spec": {
                "source": "/m",
                "replicas": 2,
                "tensorParallelSize": 2,
                "priorityClassName": "high",
                "gpuTier": ["h100"],
                "engineArgs": ["--max-model-len", "1024"],
            },
        }
    )
    footprint = ModelFootprint(weight_bytes=10 * GIB)
    w = Want.of(model, footprint)
    assert w == Want(
        "chat",
        (("chat-0", "both"), ("chat-1", "both")),
        2,
        engine_memory(footprint, model.engine, 2),
        100,
        ("h100",),
    )
    assert w.memory.weight_bytes == 5 * GIB
    assert Want.of(model, footprint, count=5).slots == w.slots  # fixed replicas: count ignored


def test_nodes_from_agent_readings() -> None:
    info = GpuInfo(
        index=3,
        uuid="GPU-3",
        name="NVIDIA H100 80GB HBM3",
        memory_total_bytes=80 * GIB,
        memory_used_bytes=30 * GIB,
        utilization_pct=0.0,
        temperature_c=0.0,
        power_w=0.0,
        ecc_uncorrected=0,
        healthy=False,
        reason="xid 48",
    )
    assert Node.from_infos("a", [info], fake=True) == Node(
        "a",
        (
            Gpu(
                index=3,
                total_bytes=80 * GIB,
                free_bytes=50 * GIB,
                healthy=False,
                fake=True,
                tier="h100",
                reason="xid 48",
            ),
        ),
    )
    assert [
        gpu_tier(n)
        for n in (
            "NVIDIA A100-SXM4-40GB",
            "NVIDIA GeForce RTX 4090",
            "Tesla T4",
            "NVIDIA L40S",
            "NVIDIA RTX A6000",
            "Fake NVIDIA H100 80GiB",
            "Fake GPU 80GiB",
            "",
        )
    ] == ["a100", "rtx4090", "t4", "l40s", "a6000", "h100", "", ""]


def test_start_records_what_the_caller_passes_back() -> None:
    p = Fleet(node("a", 2)).plan(want("m", tp=2))
    assert p.starts == (
        Start(
            engine=Engine(
                "m-0",
                "m",
                "m-0",
                "both",
                (GpuRef("a", 0), GpuRef("a", 1)),
                (int(80 * GIB * 0.92) + 1,) * 2,
            ),
            reason="new replica",
        ),
    )
