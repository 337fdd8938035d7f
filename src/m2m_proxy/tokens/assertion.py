"""Client assertions (RFC 7523 §2.2) for client_secret_jwt and private_key_jwt.

One fresh JWT per token request: ``iss`` = ``sub`` = the client id, a random
``jti``, ``iat`` now and ``exp`` a minute later, ``aud`` the IdP's issuer when it is
known (discovery) or else the token endpoint URL. Signed with HS256 (the client
secret) or with the client's private key (RS256, PS256, ES256) via ``cryptography``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets

from m2m_proxy.config import AuthMethod, ClientConfig
from m2m_proxy.keys import SigningKeyError, sign

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
LIFETIME_S = 60


def client_assertion(client: ClientConfig, *, audience: str, now: float) -> str:
    """A signed client assertion for ``client`` (a JWT auth method)."""
    header: dict[str, str] = {"typ": client.assertion_typ}
    claims = {
        "iss": client.client_id,
        "sub": client.client_id,
        "aud": audience,
        "jti": secrets.token_urlsafe(24),
        "iat": int(now),
        "exp": int(now) + LIFETIME_S,
    }
    if client.auth_method is AuthMethod.CLIENT_SECRET_JWT:
        if client.client_secret is None:
            raise SigningKeyError("client_secret_jwt needs a client secret")
        header["alg"] = "HS256"
        signing_input = _signing_input(header, claims)
        secret = client.client_secret.value.encode()
        return _join(signing_input, hmac.new(secret, signing_input, hashlib.sha256).digest())
    key = client.signing_key
    if key is None:
        raise SigningKeyError("private_key_jwt needs a private key")
    header["alg"] = key.alg
    if key.key_id:
        header["kid"] = key.key_id
    signing_input = _signing_input(header, claims)
    return _join(signing_input, sign(key.pem.value, key.alg, signing_input))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signing_input(header: dict[str, str], claims: dict[str, object]) -> bytes:
    encode = json.JSONEncoder(separators=(",", ":")).encode
    return f"{_b64(encode(header).encode())}.{_b64(encode(claims).encode())}".encode()


def _join(signing_input: bytes, signature: bytes) -> str:
    return f"{signing_input.decode()}.{_b64(signature)}"
