"""Private keys for JWS signatures (RFC 7518): load, check, sign. Pure, no I/O.

RSA keys sign RS256 or PS256; EC keys on P-256 sign ES256 (raw r||s, not DER).
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

ALGS_FOR_RSA = ("RS256", "PS256")
ALGS_FOR_EC = ("ES256",)


class SigningKeyError(ValueError):
    """The PEM is not a usable private key for the alg; the message says why."""


def sign(pem: str, alg: str, data: bytes) -> bytes:
    """The JWS signature of ``data`` with the PEM private key (RFC 7518 §3)."""
    private = load_private_key(pem)
    if alg in ("RS256", "PS256"):
        if not isinstance(private, rsa.RSAPrivateKey):
            raise SigningKeyError(f"{alg} needs an RSA private key")
        pad: padding.AsymmetricPadding = (
            padding.PKCS1v15()
            if alg == "RS256"
            else padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        )
        return private.sign(data, pad, hashes.SHA256())
    if alg == "ES256":
        if not isinstance(private, ec.EllipticCurvePrivateKey) or private.curve.name != "secp256r1":
            raise SigningKeyError("ES256 needs an EC P-256 private key")
        r, s = decode_dss_signature(private.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    raise SigningKeyError(f"unsupported alg {alg}")


def load_private_key(pem: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise SigningKeyError("only RSA and EC private keys are supported")
    return key


def check_alg(pem: str, alg: str | None) -> str:
    """The alg to sign with (``alg``, or the key's default); raises SigningKeyError."""
    key = load_private_key(pem)
    allowed = ALGS_FOR_RSA if isinstance(key, rsa.RSAPrivateKey) else ALGS_FOR_EC
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name != "secp256r1":
        raise SigningKeyError(f"EC keys must be on P-256, not {key.curve.name}")
    if alg is None:
        return allowed[0]
    if alg not in allowed:
        kind = "an RSA" if allowed is ALGS_FOR_RSA else "an EC"
        raise SigningKeyError(f"{alg} cannot be used with {kind} key; use {' or '.join(allowed)}")
    return alg
