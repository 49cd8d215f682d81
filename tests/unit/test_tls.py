"""HTTPS on the coordinator's one port (``--tls-cert``/``--tls-key``): the front server's
inference routes and hypercorn's other routes alike, with a certificate made in the test."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleet.coordinator.service import Coordinator, CoordinatorAddresses, CoordinatorConfig
from fleet.protocol.errors import ConfigError


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleet-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_both_paths_serve_https_and_plain_http_is_not_answered(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    coord = Coordinator(
        CoordinatorConfig(
            port=0, agent_endpoint="tcp://127.0.0.1:*", tls_cert=str(cert), tls_key=str(key)
        )
    )
    trusted = ssl.create_default_context(cafile=str(cert))
    async with trio.open_nursery() as nursery:
        addrs: CoordinatorAddresses = await nursery.start(coord.run)
        assert addrs.http_url.startswith("https://127.0.0.1:")
        async with httpx.AsyncClient(base_url=addrs.http_url, verify=trusted, timeout=10) as http:
            health = await http.get("/healthz")  # hypercorn's path
            assert health.status_code == 200 and health.json()["pid"] > 0
            # the front server's path: a model nobody serves is a 404 in OpenAI's shape
            missing = await http.post(
                "/v1/completions", json={"model": "none", "prompt": "x", "max_tokens": 1}
            )
            assert missing.status_code == 404 and missing.json()["error"]["code"]
            # a front-server request, then a hypercorn one, on one kept-alive TLS connection
            again = await http.get("/readyz")
            assert again.status_code in (200, 503)
        plain = addrs.http_url.replace("https://", "http://")
        async with httpx.AsyncClient(timeout=5) as http:
            with pytest.raises(httpx.HTTPError):
                await http.get(plain + "/healthz")
        untrusted = httpx.AsyncClient(timeout=5)  # the system's CAs: our certificate is unknown
        async with untrusted:
            with pytest.raises(httpx.ConnectError):
                await untrusted.get(addrs.http_url + "/healthz")
        nursery.cancel_scope.cancel()


def test_a_certificate_needs_its_key() -> None:
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        CoordinatorConfig(tls_cert="/c.pem")
