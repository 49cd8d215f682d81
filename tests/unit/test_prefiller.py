"""The SSRF probe suite (fleet.coordinator.prefiller): ``x-prefiller-host-port`` is honoured only
when it names, exactly, a registered prefill engine of the requested model; every other form is
403 and counted. By plain calls, then over the wire against a real coordinator."""

from __future__ import annotations

import json

import pytest
import trio

from fleet.coordinator.errors import render
from fleet.coordinator.prefiller import PREFILLER_HEADER, Forbidden, check_body, prefiller_of
from fleet.coordinator.registry import EngineView
from fleet.coordinator.service import Coordinator, CoordinatorAddresses, CoordinatorConfig
from fleet.protocol.messages import EngineStatus, Register

from .test_fastserve import Client, post

STATUSES = (  # (id, model, url, role)
    ("p", "demo", "http://10.0.0.5:8000", "prefill"),
    ("p-local", "demo", "http://127.0.0.1:41000", "prefill"),
    ("d", "demo", "http://10.0.0.6:8000", "decode"),
    ("b", "demo", "http://10.0.0.8:8000", "both"),
    ("other", "other-model", "http://10.0.0.7:8000", "prefill"),
)
ENGINES = [
    EngineView(i, "n1", m, u, 1, "ready", r, "vllm", 0, 32, (), True) for i, m, u, r in STATUSES
]

PROBES = {  # value -> the reason it is counted under
    # metadata services
    "169.254.169.254:80": "unknown",
    "169.254.169.254": "malformed",
    "metadata.google.internal:80": "unknown",
    "[fd00:ec2::254]:80": "malformed",
    # loopback: other ports and other spellings of a registered one
    "127.0.0.1:8000": "unknown",
    "127.0.0.1:41001": "unknown",
    "localhost:41000": "unknown",
    "127.1:41000": "unknown",
    "0x7f000001:41000": "unknown",
    "2130706433:41000": "unknown",
    "0177.0.0.1:41000": "unknown",
    "0.0.0.0:41000": "unknown",
    # a registered prefill engine on another port, or written differently
    "10.0.0.5:8001": "unknown",
    "10.0.0.5": "malformed",
    "10.0.0.5:08000": "unknown",
    "10.0.0.5:8000/admin": "malformed",
    "http://10.0.0.5:8000": "malformed",
    "10.0.0.5.:8000": "unknown",
    # DNS names
    "engine-p.default.svc.cluster.local:8000": "unknown",
    "10.0.0.5.nip.io:8000": "unknown",
    # IPv6 forms
    "[::1]:41000": "malformed",
    "::1:41000": "malformed",
    "[::ffff:127.0.0.1]:41000": "malformed",
    "::ffff:127.0.0.1:41000": "malformed",
    "[::ffff:a00:5]:8000": "malformed",
    # userinfo tricks
    "a@10.0.0.5:8000": "malformed",
    "10.0.0.5:8000@169.254.169.254:80": "malformed",
    "user:pass@10.0.0.5:8000": "malformed",
    # percent-encoding
    "10.0.0.5%3A8000": "malformed",
    "10%2E0.0.5:8000": "malformed",
    "%31%30.0.0.5:8000": "malformed",
    # whitespace and control characters
    "10.0.0.5 :8000": "malformed",
    "10.0.0.5:\t8000": "malformed",
    " 10.0.0.5:8000": "malformed",
    "10.0.0.5:8000\r\n": "malformed",
    "10.0.0.5:8000, 10.0.0.5:8000": "malformed",
    # look-alike characters
    "１０.0.0.5:8000": "malformed",
    "10.0.0.5:８０００": "malformed",
    # one bad entry in a list
    "10.0.0.5:8000,169.254.169.254:80": "unknown",
    "": "malformed",
    # registered, but not a prefill engine of this model
    "10.0.0.6:8000": "not_prefill",
    "10.0.0.8:8000": "not_prefill",
    "10.0.0.7:8000": "not_prefill",
}


@pytest.mark.parametrize("value", list(PROBES))
def test_every_probe_is_refused_under_its_reason(value: str) -> None:
    with pytest.raises(Forbidden) as err:
        prefiller_of({PREFILLER_HEADER: value}, "demo", ENGINES)
    assert err.value.reason == PROBES[value]
    body, status, _ = render(err.value)
    assert status == 403
    error = json.loads(body)["error"]
    assert error["type"] == "permission_error" and error["param"] == PREFILLER_HEADER


def test_a_registered_prefill_engine_of_the_model_is_honoured() -> None:
    assert prefiller_of({}, "demo", ENGINES) is None  # no header: the scheduler decides
    assert prefiller_of({PREFILLER_HEADER: "10.0.0.5:8000"}, "demo", ENGINES) is ENGINES[0]
    local = prefiller_of({PREFILLER_HEADER: "127.0.0.1:41000"}, "demo", ENGINES)
    assert local is ENGINES[1]  # loopback is fine when it is exactly a prefill engine
    both = prefiller_of({PREFILLER_HEADER: "10.0.0.5:8000,127.0.0.1:41000"}, "demo", ENGINES)
    assert both is ENGINES[0]  # a list: every entry checked, the first used (llm-d)
    with pytest.raises(Forbidden):  # the other model's prefill engine, asked for this one
        prefiller_of({PREFILLER_HEADER: "10.0.0.5:8000"}, "other-model", ENGINES)


def test_a_clients_kv_transfer_params_are_refused() -> None:
    check_body({"model": "demo", "prompt": "x"})
    for params in (None, {"do_remote_prefill": True, "remote_host": "169.254.169.254"}):
        with pytest.raises(Forbidden) as err:
            check_body({"model": "demo", "prompt": "x", "kv_transfer_params": params})
        assert err.value.reason == "kv_transfer_params" and err.value.status == 403


WIRE = [v for v in PROBES if v.isascii() and "\r" not in v and "\n" not in v and v == v.strip()]


async def test_the_probes_get_403_over_the_wire_and_are_counted() -> None:
    coord = Coordinator(CoordinatorConfig(port=0, agent_endpoint="tcp://127.0.0.1:*"))
    body = json.dumps({"model": "demo", "prompt": "x", "max_tokens": 1}).encode()
    async with trio.open_nursery() as nursery:
        addrs: CoordinatorAddresses = await nursery.start(coord.run)
        engines = tuple(
            EngineStatus(engine_id=i, model=m, url=u, state="ready", role=r)
            for i, m, u, r in STATUSES
        )
        coord.registry.register(Register("n1", "", "test", (), engines), trio.current_time())
        host, port = addrs.http_url.removeprefix("http://").split(":")
        client = await Client.open((host, int(port)))
        for value in WIRE:
            await client.send(post("/v1/completions", body, f"{PREFILLER_HEADER}: {value}"))
            status, headers, raw = await client.response()
            assert status == 403, value
            assert headers["content-type"] == "application/json"
            assert json.loads(raw)["error"]["param"] == PREFILLER_HEADER
        leaked = json.dumps({"model": "demo", "prompt": "x", "kv_transfer_params": {}}).encode()
        await client.send(post("/v1/completions", leaked))
        assert (await client.response())[0] == 403
        nursery.cancel_scope.cancel()
    counted = coord.metrics.ssrf_blocked
    total = sum(counted.labels(reason=r)._value.get() for r in set(PROBES.values()))
    assert total == len(WIRE)
    assert counted.labels(reason="kv_transfer_params")._value.get() == 1
