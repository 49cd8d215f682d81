"""Fake GPUs (fleet.agent.fakenvml): the SPEC, the readings the real NVML code makes of them,
XID injection through the monitor and the agent's HTTP API, and how engines on them launch."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import msgpack
import pytest
import trio

from fleet.agent.fakenvml import FakeGpuSpec, FakeNvml, parse_fake_gpus
from fleet.agent.gpus import GpuConfig, GpuMonitor, NvmlReader, discover
from fleet.agent.launcher import LaunchConfig, engine_command, engine_env
from fleet.agent.service import Agent, AgentConfig
from fleet.protocol import codec
from fleet.protocol.errors import ConfigError
from fleet.protocol.messages import EngineSpec, GpuInfo, Heartbeat

GIB = 1024**3


def test_spec_items_counts_sizes_and_health() -> None:
    gpus = parse_fake_gpus("2x80GiB, 1x24GiB:unhealthy,1x500MB")

    assert gpus == (
        FakeGpuSpec(80 * GIB),
        FakeGpuSpec(80 * GIB),
        FakeGpuSpec(24 * GIB, healthy=False),
        FakeGpuSpec(500 * 10**6),
    )


@pytest.mark.parametrize(
    ("spec", "item"),
    [
        ("", ""),
        ("2x80GiB,", "2x80GiB,"),
        ("2x80", "2x80"),
        ("4x80GiB,x24GiB", "x24GiB"),
        ("0x80GiB", "0x80GiB"),
        ("1x0GiB", "1x0GiB"),
        ("1x80GiB:broken", "1x80GiB:broken"),
        ("65x1GiB", "65x1GiB"),
    ],
)
def test_bad_spec_names_the_flag_and_the_item(spec: str, item: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_fake_gpus(spec)

    assert caught.value.key == "--fake-gpus"
    assert caught.value.value == item
    assert "--fake-gpus" in str(caught.value)


def test_readings_come_through_the_real_reader_marked_fake() -> None:
    gpus = discover(FakeNvml(parse_fake_gpus("1x80GiB,1x24GiB:unhealthy"), node="n 1"))

    good, bad = gpus
    assert good == GpuInfo(
        index=0,
        uuid="GPU-fake-n-1-00",
        name="Fake GPU 80GiB",
        memory_total_bytes=80 * GIB,
        memory_used_bytes=0,
        utilization_pct=0.0,
        temperature_c=30.0,
        power_w=50.0,
        ecc_uncorrected=0,
        healthy=True,
        fake=True,
    )
    assert (bad.index, bad.healthy, bad.fake) == (1, False, True)
    assert bad.reason == "nvml: GPU is lost"


def test_two_nodes_fake_gpus_have_distinct_uuids() -> None:
    spec = parse_fake_gpus("1x80GiB")
    assert discover(FakeNvml(spec, node="a"))[0].uuid != discover(FakeNvml(spec, node="b"))[0].uuid


def test_real_readings_are_not_fake_and_old_senders_decode_as_real() -> None:
    class NotFake:  # NvmlReader only looks for the marker
        NVMLError = Exception

    assert NvmlReader(NotFake()).fake is False
    gpu = GpuInfo(0, "GPU-x", "H100", 1, 0, 0.0, 0.0, 0.0, 0, healthy=True)
    beat = Heartbeat("n1", 1, True, gpus=(gpu,))
    header, payload = codec.encode(beat)
    # An agent without the field: take "fake" out of the wire map and decode.
    wire = msgpack.unpackb(payload, raw=False)
    for g in wire["gpus"]:
        del g["fake"]
    decoded = codec.decode([header, msgpack.packb(wire, use_bin_type=True)])
    assert isinstance(decoded, Heartbeat) and decoded.gpus == (gpu,)
    assert decoded.gpus[0].fake is False


async def test_injected_xid_makes_the_gpu_unhealthy_through_the_monitor() -> None:
    fake = FakeNvml(parse_fake_gpus("2x80GiB"))
    monitor = GpuMonitor(GpuConfig(refresh_s=60, xid_wait_ms=50), nvml_module=fake)
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        assert [g.healthy for g in monitor.snapshot()] == [True, True]
        fake.inject_xid(1, 79)
        with trio.fail_after(5):  # a safety bound: the watcher sees it within xid_wait_ms
            while monitor.snapshot()[1].healthy:
                await monitor.updated()
        nursery.cancel_scope.cancel()

    gpu0, gpu1 = monitor.snapshot()
    assert gpu0.healthy and gpu0.xids == ()
    assert (gpu1.healthy, gpu1.xids, gpu1.reason, gpu1.fake) == (False, (79,), "xid 79", True)


def test_engines_on_fake_gpus_launch_as_cpu_engines() -> None:
    spec = EngineSpec("m-0", "m", "/models/m", kind="sim", gpus=(0, 1))
    fake = LaunchConfig(fake_gpus=True)
    argv = engine_command(spec, fake, port=9, kv_endpoint="tcp://127.0.0.1:1")
    env = engine_env(spec, fake, gpu_uuids={}, base={})

    assert "--tensor-parallel-size" not in argv
    assert argv[-len(fake.cpu_args) :] == list(fake.cpu_args)
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    # Real GPUs keep the GPU launch.
    real = LaunchConfig()
    argv = engine_command(spec, real, port=9, kv_endpoint="tcp://127.0.0.1:1")
    env = engine_env(spec, real, gpu_uuids={0: "GPU-a", 1: "GPU-b"}, base={})
    assert argv[-2:] == ["--tensor-parallel-size", "2"]
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-a,GPU-b"


@pytest.mark.parametrize("fake_gpus", ["2x80GiB", None])
async def test_agent_xid_endpoint(tmp_path: Path, fake_gpus: str | None) -> None:
    """Fake GPUs take an XID (202) and turn unhealthy in /api/v1/gpus; an unknown index is 404;
    an agent on real NVML (here: none) answers 409."""
    cfg = AgentConfig(
        node_id="n1",
        coordinator_endpoint="tcp://127.0.0.1:9",  # nobody: the HTTP API works without
        http_port=0,
        log_dir=tmp_path,
        launch=LaunchConfig(python=sys.executable),
        gpu=GpuConfig(refresh_s=60, xid_wait_ms=50),
        fake_gpus=parse_fake_gpus(fake_gpus) if fake_gpus else (),
    )
    agent = Agent(cfg)
    async with trio.open_nursery() as nursery, httpx.AsyncClient() as client:
        url = await nursery.start(agent.run)
        inject = url + "/api/v1/gpus/{}/xid"
        if fake_gpus is None:
            assert (await client.post(inject.format(0))).status_code == 409
            nursery.cancel_scope.cancel()
            return
        assert agent.cfg.launch.fake_gpus
        missing = await client.post(inject.format(2))
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "no_gpu"
        bad = await client.post(inject.format(0), json={"xid": "x"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "xid"
        answer = await client.post(inject.format(1), json={"xid": 48})
        assert (answer.status_code, answer.json()) == (202, {"gpu": 1, "xid": 48})
        with trio.fail_after(5):
            while agent.gpus.snapshot()[1].healthy:
                await agent.gpus.updated()
        gpus = (await client.get(url + "/api/v1/gpus")).json()["gpus"]
        nursery.cancel_scope.cancel()

    assert [(g["healthy"], g["fake"], g["xids"]) for g in gpus] == [
        (True, True, []),
        (False, True, [48]),
    ]
