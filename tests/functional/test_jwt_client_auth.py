"""private_key_jwt and client_secret_jwt against the real IdP (oidc-provider)."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from dev_stack import DevStack

from m2m_proxy.config import AuthMethod, ClientConfig, Secret, SigningKey
from m2m_proxy.tokens.assertion import client_assertion
from tests.functional.conftest import RESOURCE, ROOT
from tests.functional.support import SENTINEL_SECRET, running_proxy


def _b64(n: int, size: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes(size, "big")).rstrip(b"=").decode()


def _public_jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str) -> dict[str, str]:
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.public_key().public_numbers()
        return {"kty": "RSA", "kid": kid, "n": _b64(numbers.n, 256), "e": _b64(numbers.e, 3)}
    point = key.public_key().public_numbers()
    return {"kty": "EC", "crv": "P-256", "kid": kid, "x": _b64(point.x, 32), "y": _b64(point.y, 32)}


KEYS: dict[str, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey] = {}


@pytest.fixture(scope="module")
def jwt_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    KEYS["rsa"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    KEYS["ec"] = ec.generate_private_key(ec.SECP256R1())
    clients: list[dict[str, Any]] = [
        {
            "client_id": "jwt-rsa",
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": {"keys": [_public_jwk(KEYS["rsa"], "rsa-1")]},
        },
        {
            "client_id": "jwt-ec",
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": {"keys": [_public_jwk(KEYS["ec"], "ec-1")]},
        },
        {
            "client_id": "jwt-hs",
            "client_secret": SENTINEL_SECRET,
            "token_endpoint_auth_method": "client_secret_jwt",
        },
    ]
    resources: dict[str, dict[str, object]] = {RESOURCE: {"scope": "read write", "ttl_s": 300}}
    with DevStack(ROOT, clients=clients, resources=resources) as stack:
        yield stack


def _key_file(directory: Path, name: str) -> Path:
    path = directory / f"{name}.pem"
    path.write_bytes(
        KEYS[name].private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


async def test_private_key_jwt_and_client_secret_jwt_get_tokens(
    jwt_stack: DevStack, tmp_path: Path
) -> None:
    stack = jwt_stack
    stack.reset()
    routes = f"""
clients:
  rsa:
    token_url: {stack.token_url}
    client_id: jwt-rsa
    auth_method: private_key_jwt
    private_key_file: {_key_file(tmp_path, "rsa")}
    key_id: rsa-1
    signing_alg: PS256
  ec:
    issuer: {stack.issuer}
    client_id: jwt-ec
    auth_method: private_key_jwt
    private_key_file: {_key_file(tmp_path, "ec")}
  hs:
    token_url: {stack.token_url}
    client_id: jwt-hs
    client_secret: ${{SENTINEL_SECRET}}
    auth_method: client_secret_jwt
routes:
"""
    for name in ("rsa", "ec", "hs"):
        routes += (
            f"  - {{host: {name}.test, client: {name}, scope: read, "
            f'resource: "{RESOURCE}", upstream: "{stack.api_url}"}}\n'
        )
    async with running_proxy(routes) as proxy, aiohttp.ClientSession() as client:
        for host, client_id in (
            ("rsa.test", "jwt-rsa"),
            ("ec.test", "jwt-ec"),
            ("hs.test", "jwt-hs"),
        ):
            async with client.get(f"http://{host}/x", proxy=proxy.url) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["client_id"] == client_id
        logs = proxy.logs.getvalue()
    records = {r["form"]["client_id"]: r for r in stack.token_requests()}
    assert records["jwt-rsa"]["assertion_header"] == {"typ": "JWT", "alg": "PS256", "kid": "rsa-1"}
    assert records["jwt-rsa"]["assertion_claims"]["aud"] == stack.token_url  # no issuer known
    assert records["jwt-ec"]["assertion_header"]["alg"] == "ES256"
    assert records["jwt-ec"]["assertion_claims"]["aud"] == stack.issuer  # discovered issuer
    assert records["jwt-hs"]["assertion_header"]["alg"] == "HS256"
    assert "client_secret" not in records["jwt-hs"]["form"]
    for record in records.values():
        claims = record["assertion_claims"]
        assert claims["iss"] == claims["sub"] == record["form"]["client_id"]
        assert claims["exp"] - claims["iat"] == 60
        assert record["auth_header_scheme"] is None
    assert SENTINEL_SECRET not in logs and "PRIVATE KEY" not in logs


async def test_client_assertion_file_is_read_again_for_every_token_request(
    jwt_stack: DevStack, tmp_path: Path
) -> None:
    """A Kubernetes-style projected token: someone else signs and rotates the file."""
    stack = jwt_stack
    stack.reset()
    signer = ClientConfig(
        name="signer",
        token_url=stack.token_url,
        client_id="jwt-rsa",
        client_secret=None,
        auth_method=AuthMethod.PRIVATE_KEY_JWT,
        signing_key=SigningKey(Secret(_key_file(tmp_path, "rsa").read_text()), "RS256", "rsa-1"),
    )
    assertion_file = tmp_path / "token"

    def rotate() -> str:
        assertion = client_assertion(signer, audience=stack.token_url, now=time.time())
        assertion_file.write_text(assertion + "\n")
        return assertion

    first = rotate()
    routes = f"""
clients:
  projected:
    token_url: {stack.token_url}
    client_id: jwt-rsa
    auth_method: private_key_jwt
    client_assertion_file: {assertion_file}
routes:
  - {{host: read.test, client: projected, scope: read, resource: "{RESOURCE}",
      upstream: "{stack.api_url}"}}
  - {{host: write.test, client: projected, scope: "read write", resource: "{RESOURCE}",
      upstream: "{stack.api_url}"}}
"""
    async with running_proxy(routes) as proxy, aiohttp.ClientSession() as client:
        async with client.get("http://read.test/", proxy=proxy.url) as resp:
            assert resp.status == 200
        second = rotate()  # a reused jti would be refused by the IdP
        async with client.get("http://write.test/", proxy=proxy.url) as resp:
            assert resp.status == 200
    sent = [r["form"]["client_assertion"] for r in stack.token_requests()]
    assert sent == [first, second]
