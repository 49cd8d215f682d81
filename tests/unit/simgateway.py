"""A gateway over real simulated engines started in-process (shared by the resilience tests)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import httpx
import trio

from fleet.agent.launcher import LaunchConfig, engine_command
from fleet.agent.sim.config import parse_args
from fleet.agent.sim.server import SimServer
from fleet.coordinator.kvindex import KVIndex
from fleet.coordinator.metrics import CoordinatorMetrics
from fleet.coordinator.pdsplit import PDConfig
from fleet.coordinator.pools import EnginePools
from fleet.coordinator.proxy import Gateway
from fleet.coordinator.registry import FleetRegistry
from fleet.coordinator.resilience import ResilienceConfig
from fleet.coordinator.router.config import DEFAULT_CONFIG, load_config
from fleet.coordinator.router.prompt import PromptTokenizer
from fleet.coordinator.router.scheduler import Scheduler
from fleet.protocol.messages import EngineSpec, EngineStatus, Register


async def start_sim(demo_model: Path, nursery: trio.Nursery, *extra: str) -> str:
    """Start a simulated engine (no KV events) in ``nursery``; its URL."""
    _, url = await start_sim_server(demo_model, nursery, *extra)
    return url


async def start_sim_server(
    demo_model: Path, nursery: trio.Nursery, *extra: str
) -> tuple[SimServer, str]:
    """Start a simulated engine (no KV events) in ``nursery``; the server (whose ``engine`` a
    test can watch: it runs in this process) and its URL."""
    spec = EngineSpec(engine_id="s", model="demo", model_path=str(demo_model), kind="sim")
    argv = engine_command(spec, LaunchConfig(), port=0, kv_endpoint="tcp://127.0.0.1:9")
    i = argv.index("--kv-events-config")
    argv[i + 1] = json.dumps({"enable_kv_cache_events": False})
    server = SimServer(parse_args([*argv[3:], *extra]), grace_s=0.2)
    url: str = await nursery.start(server.run)
    return server, url


def sim_gateway(
    urls: dict[str, str],
    demo_model: Path,
    resilience: ResilienceConfig,
    nodes: dict[str, str] | None = None,
    *,
    roles: dict[str, str] | None = None,
    config: str = DEFAULT_CONFIG,
    pd: PDConfig | None = None,
) -> tuple[Gateway, EnginePools]:
    """A gateway routing model ``demo`` to the engines ``urls`` (engine id → URL), on node
    ``n1`` or the node ``nodes`` names for the engine, each with the role ``roles`` gives it
    (default ``both``), scheduled by ``config`` (an EndpointPickerConfig)."""
    registry = FleetRegistry(lost_after_s=60)
    by_node: dict[str, list[EngineStatus]] = {}
    for e, u in urls.items():
        by_node.setdefault((nodes or {}).get(e, "n1"), []).append(
            EngineStatus(
                engine_id=e,
                model="demo",
                url=u,
                state="ready",
                kind="sim",
                role=(roles or {}).get(e, "both"),
            )
        )
    for node, engines in by_node.items():
        registry.register(Register(node, "", "test", (), tuple(engines)), trio.current_time())
    pools = EnginePools(timeout=httpx.Timeout(10.0), max_connections=16, max_keepalive=8)
    gateway = Gateway(
        pools,
        registry,
        CoordinatorMetrics(),
        scheduler=Scheduler(load_config(config), KVIndex(), rng=random.Random(0)),
        tokenizer=PromptTokenizer({"demo": str(demo_model)}),
        resilience=resilience,
        pd=pd,
        rng=random.Random(0),
    )
    return gateway, pools


async def start_hung_listener(nursery: trio.Nursery) -> str:
    """A TCP server that accepts connections and never answers, like a SIGSTOPped engine
    (the kernel completes handshakes; nothing reads). Its URL."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    held: list[trio.SocketStream] = []

    async def accept_forever() -> None:
        while True:
            held.append(await listeners[0].accept())

    nursery.start_soon(accept_forever)
    port = listeners[0].socket.getsockname()[1]
    return f"http://127.0.0.1:{port}"
