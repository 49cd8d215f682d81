"""The perimeter (coordinator/perimeter.py): binding beyond loopback needs keys, and the admin
key guards the KV/cache inspection routes as it guards /admin/* (a real coordinator, loopback)."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
import trio

from fleet.coordinator.perimeter import is_loopback, open_problem
from fleet.coordinator.service import Coordinator, CoordinatorAddresses, CoordinatorConfig


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("[::1]", True),
     ("localhost", True), ("0.0.0.0", False), ("::", False), ("10.0.0.7", False),
     ("fleet.example.com", False), ("", False), ("::ffff:127.0.0.1", False)],
)  # fmt: skip
def test_only_loopback_addresses_count_as_this_machine(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_beyond_loopback_both_keys_are_needed_unless_allowed_open() -> None:
    assert open_problem("127.0.0.1", admin_key=False, api_keys=False, allow_open=False) is None
    why = open_problem("0.0.0.0", admin_key=False, api_keys=True, allow_open=False)
    assert why is not None and "--admin-key" in why and "--api-keys" not in why
    why = open_problem("0.0.0.0", admin_key=False, api_keys=False, allow_open=False)
    assert why is not None and "--admin-key and --api-keys" in why and "--allow-open" in why
    assert open_problem("0.0.0.0", admin_key=True, api_keys=True, allow_open=False) is None
    assert open_problem("0.0.0.0", admin_key=False, api_keys=False, allow_open=True) is None


def test_the_cli_refuses_to_serve_beyond_loopback_without_keys() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fleet", "coordinator", "--host", "0.0.0.0", "--port", "0",
         "--engine", "sim"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "--admin-key and --api-keys" in done.stderr + done.stdout


async def test_the_admin_key_guards_the_kv_and_cache_inspection_routes() -> None:
    coord = Coordinator(
        CoordinatorConfig(port=0, agent_endpoint="tcp://127.0.0.1:*", admin_key="s3cret")
    )
    body = {"model": "demo", "prompt": "hi"}
    routes = [("GET", "/api/v1/cache/state"), ("GET", "/api/v1/cache/pod/e-0"),
              ("POST", "/api/v1/route/explain"), ("POST", "/api/v1/score"),
              ("GET", "/admin/v1/deployments")]  # fmt: skip
    async with trio.open_nursery() as nursery:
        addrs: CoordinatorAddresses = await nursery.start(coord.run)
        async with httpx.AsyncClient(base_url=addrs.http_url, timeout=10) as http:
            for method, path in routes:
                kwargs = {"json": body} if method == "POST" else {}
                refused = await http.request(method, path, **kwargs)
                assert refused.status_code == 401, path
                assert refused.json()["error"]["code"] == "invalid_admin_key"
                wrong = await http.request(
                    method, path, headers={"authorization": "Bearer nope"}, **kwargs
                )
                assert wrong.status_code == 401, path
                allowed = await http.request(
                    method, path, headers={"authorization": "Bearer s3cret"}, **kwargs
                )
                assert allowed.status_code != 401, (path, allowed.text)
            assert (await http.get("/healthz")).status_code == 200  # probes stay open
            assert (await http.get("/api/v1/engines")).status_code == 200
        nursery.cancel_scope.cancel()
