"""Throwaway PKI for tests, generated at test time (trustme, cryptography); no key
material is ever committed."""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path

    def der(self) -> bytes:
        return x509.load_pem_x509_certificate(self.cert.read_bytes()).public_bytes(
            serialization.Encoding.DER
        )

    def thumbprint(self) -> str:
        """RFC 8705 x5t#S256: base64url(SHA-256(DER)) without padding."""
        import base64  # noqa: PLC0415 - only this helper needs it

        digest = hashlib.sha256(self.der()).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def write_ca(ca: trustme.CA, path: Path) -> Path:
    ca.cert_pem.write_to_path(str(path))
    return path


def issue(
    ca: trustme.CA, directory: Path, name: str, *identities: str, cn: str | None = None
) -> CertFiles:
    """A leaf for ``identities`` (hosts, IPs) signed by ``ca``, written as name.pem/name-key.pem."""
    leaf = ca.issue_cert(*identities, common_name=cn)
    cert = directory / f"{name}.pem"
    key = directory / f"{name}-key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    return CertFiles(cert, key)


def self_signed(directory: Path, name: str, cn: str) -> CertFiles:
    """A self-signed client certificate (RFC 8705 self_signed_tls_client_auth)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    files = CertFiles(directory / f"{name}.pem", directory / f"{name}-key.pem")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    files.key.chmod(0o600)
    return files
