"""RFC 8705 against the real IdP (oidc-provider over https on loopback): tls_client_auth
found through discovery's mtls_endpoint_aliases, self_signed_tls_client_auth, and a
certificate-bound token (cnf.x5t#S256) accepted by an upstream that sees the same
certificate. Every certificate is generated here, at test time."""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from dev_stack import DevStack

from tests.functional.conftest import RESOURCE, ROOT
from tests.functional.support import running_proxy
from tests.pki import CertFiles, issue, self_signed, write_ca


@dataclass
class Pki:
    ca: trustme.CA
    ca_file: Path
    client: CertFiles
    self_signed: CertFiles


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwk_with_x5c(files: CertFiles) -> dict[str, Any]:
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    point = public.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": _b64(point.x.to_bytes(32, "big")),
        "y": _b64(point.y.to_bytes(32, "big")),
        "x5c": [base64.b64encode(files.der()).decode()],
    }


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    return Pki(
        ca=ca,
        ca_file=write_ca(ca, directory / "ca.pem"),
        client=issue(ca, directory, "svc-mtls", "svc-mtls.example"),
        self_signed=self_signed(directory, "svc-self", "svc-self"),
    )


@pytest.fixture(scope="module")
def mtls_stack(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    server = issue(pki.ca, tmp_path_factory.mktemp("idp"), "idp", "127.0.0.1")
    clients: list[dict[str, Any]] = [
        {
            "client_id": "svc-mtls",
            "token_endpoint_auth_method": "tls_client_auth",
            "tls_client_auth_san_dns": "svc-mtls.example",
            "tls_client_certificate_bound_access_tokens": True,
        },
        {
            "client_id": "svc-self",
            "token_endpoint_auth_method": "self_signed_tls_client_auth",
            "jwks": {"keys": [_jwk_with_x5c(pki.self_signed)]},
        },
    ]
    resources: dict[str, dict[str, object]] = {RESOURCE: {"scope": "read write", "ttl_s": 300}}
    with DevStack(
        ROOT,
        clients=clients,
        resources=resources,
        tls_cert_file=server.cert,
        tls_key_file=server.key,
        tls_client_ca_file=pki.ca_file,
        tls_ca_file=pki.ca_file,
    ) as stack:
        yield stack


def _claims(authorization: str) -> dict[str, Any]:
    payload = authorization.removeprefix("Bearer ").split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert isinstance(claims, dict)
    return claims


def _certificate_client(
    endpoint: str, client_id: str, method: str, cert: CertFiles, ca_file: Path
) -> str:
    """A client authenticating with ``cert`` (``endpoint``: an issuer or token_url line)."""
    return f"""
clients:
  cert:
    {endpoint}
    client_id: {client_id}
    auth_method: {method}
    client_cert_file: {cert.cert}
    client_key_file: {cert.key}
    ca_file: {ca_file}
"""


async def _who(stack: DevStack, clients: str, upstream: str) -> str:
    """The client_id the demo API saw for a request through the proxy."""
    routes = (
        clients
        + f"""
routes:
  - host: api.demo.local
    client: cert
    scope: read
    resource: {RESOURCE}
    upstream: {upstream}
"""
    )
    stack.reset()
    async with running_proxy(routes) as proxy, aiohttp.ClientSession() as client:
        async with client.get("http://api.demo.local/who", proxy=proxy.url) as resp:
            assert resp.status == 200, await resp.text()
            return str((await resp.json())["client_id"])


async def test_tls_client_auth_through_discovery_uses_the_mtls_alias(
    mtls_stack: DevStack, pki: Pki
) -> None:
    """The main token endpoint never asks for a certificate: a token proves the alias."""
    clients = _certificate_client(
        f"issuer: {mtls_stack.issuer}", "svc-mtls", "tls_client_auth", pki.client, pki.ca_file
    )
    assert await _who(mtls_stack, clients, mtls_stack.api_url) == "svc-mtls"
    [record] = mtls_stack.token_requests()
    assert record["client_cert_subject"] is not None
    assert record["form"] == {
        "grant_type": "client_credentials",
        "client_id": "svc-mtls",
        "scope": "read",
        "resource": RESOURCE,
    }


async def test_self_signed_tls_client_auth_with_a_token_url(mtls_stack: DevStack, pki: Pki) -> None:
    clients = _certificate_client(
        f"token_url: {mtls_stack.mtls_token_url}",
        "svc-self",
        "self_signed_tls_client_auth",
        pki.self_signed,
        pki.ca_file,
    )
    assert await _who(mtls_stack, clients, mtls_stack.api_url) == "svc-self"
    [record] = mtls_stack.token_requests()
    assert record["client_cert_subject"] == "CN=svc-self"


@dataclass
class BoundUpstream:
    """An https API that demands a client certificate and a token bound to it."""

    url: str
    seen: list[tuple[str, str]]  # (cnf.x5t#S256 of the token, thumbprint of the TLS cert)


@pytest.fixture
async def bound_upstream(pki: Pki, tmp_path: Path) -> AsyncIterator[BoundUpstream]:
    server = issue(pki.ca, tmp_path, "api", "127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server.cert, server.key)
    context.load_verify_locations(pki.ca_file)
    context.verify_mode = ssl.CERT_REQUIRED
    seen: list[tuple[str, str]] = []

    async def handle(request: web.Request) -> web.Response:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        presented = _b64(hashlib.sha256(der).digest()) if der else ""
        bound = _claims(request.headers.get("Authorization", "")).get("cnf", {}).get("x5t#S256", "")
        seen.append((bound, presented))
        if not bound or bound != presented:
            return web.Response(status=401, text="token not bound to this certificate")
        return web.Response(text="bound ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    yield BoundUpstream(f"https://127.0.0.1:{port}", seen)
    await runner.cleanup()


async def test_a_certificate_bound_token_works_end_to_end(
    mtls_stack: DevStack, pki: Pki, bound_upstream: BoundUpstream
) -> None:
    routes = f"""
clients:
  mtls:
    token_url: {mtls_stack.mtls_token_url}
    client_id: svc-mtls
    auth_method: tls_client_auth
    client_cert_file: {pki.client.cert}
    client_key_file: {pki.client.key}
    ca_file: {pki.ca_file}
routes:
  - host: bound.demo.local
    client: mtls
    scope: read
    resource: {RESOURCE}
    upstream: {bound_upstream.url}
    ca_file: {pki.ca_file}
    client_certificate: true
"""
    async with running_proxy(routes) as proxy, aiohttp.ClientSession() as client:
        for _ in range(2):
            async with client.get("http://bound.demo.local/x", proxy=proxy.url) as resp:
                assert resp.status == 200, await resp.text()
                assert await resp.text() == "bound ok"
    assert bound_upstream.seen == [(pki.client.thumbprint(), pki.client.thumbprint())] * 2
