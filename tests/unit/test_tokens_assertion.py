"""Client assertions: claims, headers and signatures that a verifier accepts."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from m2m_proxy.config import AuthMethod, ClientConfig, CredentialSpec, Secret, SigningKey
from m2m_proxy.keys import SigningKeyError, check_alg
from m2m_proxy.tokens.assertion import ASSERTION_TYPE, client_assertion
from m2m_proxy.tokens.client import build_request

NOW = 1_800_000_000.0


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def split(jwt: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    header, payload, signature = jwt.split(".")
    return (
        json.loads(unb64(header)),
        json.loads(unb64(payload)),
        f"{header}.{payload}".encode(),
        unb64(signature),
    )


def client(method: AuthMethod, key: SigningKey | None = None) -> ClientConfig:
    return ClientConfig(
        name="orders",
        token_url="https://idp.example.com/token",
        client_id="orders-id",
        client_secret=Secret("hs-secret") if key is None else None,
        auth_method=method,
        signing_key=key,
    )


@pytest.mark.parametrize("alg", ["RS256", "PS256"])
def test_rsa_assertions_verify_with_the_public_key(alg: str) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwt = client_assertion(
        client(AuthMethod.PRIVATE_KEY_JWT, SigningKey(Secret(pem(key)), alg, "kid-1")),
        audience="https://idp.example.com",
        now=NOW,
    )
    header, claims, signed, signature = split(jwt)
    assert header == {"typ": "JWT", "alg": alg, "kid": "kid-1"}
    pad: padding.AsymmetricPadding = (
        padding.PKCS1v15()
        if alg == "RS256"
        else padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    )
    key.public_key().verify(signature, signed, pad, hashes.SHA256())  # raises if invalid
    assert claims["iss"] == claims["sub"] == "orders-id"
    assert claims["aud"] == "https://idp.example.com"
    assert (claims["iat"], claims["exp"]) == (int(NOW), int(NOW) + 60)


def test_es256_assertions_are_raw_r_s_and_verify() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jwt = client_assertion(
        client(AuthMethod.PRIVATE_KEY_JWT, SigningKey(Secret(pem(key)), "ES256")),
        audience="https://idp.example.com/token",
        now=NOW,
    )
    header, _, signed, signature = split(jwt)
    assert header == {"typ": "JWT", "alg": "ES256"}
    assert len(signature) == 64
    der = encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    key.public_key().verify(der, signed, ec.ECDSA(hashes.SHA256()))


def test_hs256_assertions_are_signed_with_the_client_secret() -> None:
    jwt = client_assertion(client(AuthMethod.CLIENT_SECRET_JWT), audience="a", now=NOW)
    header, _, signed, signature = split(jwt)
    assert header["alg"] == "HS256"
    assert signature == hmac.new(b"hs-secret", signed, hashlib.sha256).digest()


def test_every_assertion_has_a_fresh_jti() -> None:
    c = client(AuthMethod.CLIENT_SECRET_JWT)
    jtis = {split(client_assertion(c, audience="a", now=NOW))[1]["jti"] for _ in range(50)}
    assert len(jtis) == 50


def test_jwt_methods_send_the_assertion_and_no_secret() -> None:
    form, headers = build_request(
        client(AuthMethod.CLIENT_SECRET_JWT), CredentialSpec(client="orders"), assertion="a.b.c"
    )
    assert form == {
        "grant_type": "client_credentials",
        "client_id": "orders-id",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": "a.b.c",
    }
    assert "Authorization" not in headers


def test_alg_must_fit_the_key() -> None:
    rsa_pem = pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    ec_pem = pem(ec.generate_private_key(ec.SECP256R1()))
    assert (check_alg(rsa_pem, None), check_alg(ec_pem, None)) == ("RS256", "ES256")
    with pytest.raises(SigningKeyError, match="ES256 cannot be used with an RSA key"):
        check_alg(rsa_pem, "ES256")
    with pytest.raises(SigningKeyError, match="EC keys must be on P-256"):
        check_alg(pem(ec.generate_private_key(ec.SECP384R1())), None)
    with pytest.raises(SigningKeyError, match="not an unencrypted PEM private key"):
        check_alg("-----BEGIN NOTHING-----", None)
