"""The local CA behind TLS interception, and the leaf certificates minted from it.

``init_ca`` writes a new CA to a directory: ``ca.pem`` and ``ca-key.pem`` (ECDSA P-256,
PKCS8, mode 0600 from the moment it exists). It never overwrites either file.
``load_ca`` reads a CA back and refuses, with a message naming the file and the fix, a
missing file, a key readable or writable by group or others, a certificate that is not a
CA, a key that does not match it, or a CA outside its validity. RSA and EC CAs work.

``LeafCertificates`` mints, per host, a leaf certificate signed by the CA, all leaves
sharing one ECDSA P-256 key made once per instance, and returns a server ``SSLContext``
(TLS 1.2+, ALPN ``http/1.1``) presenting leaf + CA. Contexts are kept in a bounded LRU
and re-minted when within 10 % of their lifetime of expiring. ``ssl`` only loads chains
from files, so the PEM is written to a private temporary directory (0700, file 0600) and
removed right after loading; ``close()`` removes the directory.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Self, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CERT_NAME = "ca.pem"
KEY_NAME = "ca-key.pem"
CLOCK_SKEW = timedelta(hours=1)
REFRESH_FRACTION = 0.1  # re-mint a leaf in the last 10 % of its lifetime
_MAX_CN = 64  # RFC 5280 ub-common-name; longer hosts get a SAN-only subject
_CURVES = ("secp256r1", "secp384r1", "secp521r1")
_MIN_RSA_BITS = 2048

CAKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class CAError(ValueError):
    """The CA cannot be created, loaded or used; the message names the file and the fix."""


@dataclass(frozen=True, slots=True)
class CAFiles:
    cert_file: Path
    key_file: Path


@dataclass(frozen=True, slots=True, eq=False)
class InterceptionCA:
    """A CA certificate and its private key; the repr never shows the key."""

    certificate: x509.Certificate
    key: CAKey = field(repr=False)


def init_ca(
    directory: Path,
    *,
    common_name: str = "m2m-proxy interception CA",
    valid_days: int = 825,
    now: datetime | None = None,
) -> CAFiles:
    """Create ``ca.pem`` and ``ca-key.pem`` in ``directory`` (made 0700 if missing)."""
    files = CAFiles(directory / CERT_NAME, directory / KEY_NAME)
    for path in (files.cert_file, files.key_file):
        if path.exists():
            raise CAError(
                f"'{path}' already exists; refusing to overwrite a CA. "
                f"Use the existing CA, or move both files away to create a new one"
            )
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CAError(f"cannot create CA directory '{directory}' ({_reason(exc)})") from None
    now = now or datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _create(files.key_file, key_pem, 0o600)
    try:
        _create(files.cert_file, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    except CAError:
        files.key_file.unlink()  # a key without its certificate would block the next init
        raise
    return files


def load_ca(cert_file: str | Path, key_file: str | Path) -> InterceptionCA:
    """Read and check a CA; raise CAError naming the file and the fix."""
    cert_path, key_path = Path(cert_file), Path(key_file)
    cert = _load_cert(cert_path)
    key = _load_key(key_path)
    public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*public) != cert.public_key().public_bytes(*public):
        raise CAError(
            f"'{key_path}' is not the private key of '{cert_path}'; "
            f"point the key file at the key the CA certificate was made with"
        )
    now = datetime.now(UTC)
    if now < cert.not_valid_before_utc:
        raise CAError(
            f"'{cert_path}' is not valid until {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; "
            f"check the system clock"
        )
    if now >= cert.not_valid_after_utc:
        raise CAError(
            f"'{cert_path}' expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
            f"create a new CA and trust it in the clients"
        )
    return InterceptionCA(cert, key)


class LeafCertificates:
    """Per-host server contexts with leaves signed by one CA, in a bounded LRU."""

    def __init__(
        self,
        ca: InterceptionCA,
        *,
        max_entries: int = 1024,
        validity: timedelta = timedelta(days=1),
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        if validity <= timedelta(0):
            raise ValueError("validity must be positive")
        self._ca = ca
        self._max_entries = max_entries
        self._validity = validity
        self._clock = clock or _utcnow
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._key_pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._ca_pem = ca.certificate.public_bytes(serialization.Encoding.PEM)
        self._ski = x509.SubjectKeyIdentifier.from_public_key(self._key.public_key())
        self._aki = _authority_key_id(ca)
        self._entries: OrderedDict[str, _Leaf] = OrderedDict()
        self._minted = 0
        self._directory: str | None = tempfile.mkdtemp(prefix="m2m-proxy-leaf-")

    @property
    def minted(self) -> int:
        """Leaf certificates minted so far (for metrics)."""
        return self._minted

    def __len__(self) -> int:
        return len(self._entries)

    def server_context(self, host: str) -> ssl.SSLContext:
        """A server context presenting a leaf for ``host`` (a name or a bare IP literal)."""
        return self._leaf(host).context

    def certificate(self, host: str) -> x509.Certificate:
        """The leaf that ``server_context(host)`` presents (minting it if needed)."""
        return self._leaf(host).certificate

    def close(self) -> None:
        """Drop cached contexts and remove the temporary directory. Idempotent."""
        self._entries.clear()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _leaf(self, host: str) -> _Leaf:
        now = self._clock()
        leaf = self._entries.get(host)
        if leaf is not None and now < leaf.refresh_at:
            self._entries.move_to_end(host)
            return leaf
        leaf = self._mint(host, now)
        self._entries[host] = leaf
        self._entries.move_to_end(host)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return leaf

    def _mint(self, host: str, now: datetime) -> _Leaf:
        if self._directory is None:
            raise RuntimeError("LeafCertificates is closed")
        ca_cert = self._ca.certificate
        not_after = min(now + self._validity, ca_cert.not_valid_after_utc)
        if not_after <= now:
            raise CAError(
                f"the interception CA expired on {ca_cert.not_valid_after_utc:%Y-%m-%d} UTC; "
                f"create a new CA and trust it in the clients"
            )
        san, common_name = _names(host)
        subject = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
            .issuer_name(ca_cert.subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(max(now - CLOCK_SKEW, ca_cert.not_valid_before_utc))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            # RFC 5280 §4.2.1.6: with an empty subject the SAN must be critical.
            .add_extension(x509.SubjectAlternativeName([san]), critical=not subject)
            .add_extension(self._ski, critical=False)
            .add_extension(self._aki, critical=False)
            .sign(self._ca.key, hashes.SHA256())
        )
        context = self._context(cert, self._directory)
        self._minted += 1
        refresh_at = not_after - (not_after - now) * REFRESH_FRACTION
        return _Leaf(cert, context, refresh_at)

    def _context(self, cert: x509.Certificate, directory: str) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        path = Path(directory, f"leaf-{os.urandom(8).hex()}.pem")
        pem = self._key_pem + cert.public_bytes(serialization.Encoding.PEM) + self._ca_pem
        _create(path, pem, 0o600)
        try:
            context.load_cert_chain(path)  # the key is read from the same file
        finally:
            path.unlink()
        return context


@dataclass(frozen=True, slots=True)
class _Leaf:
    certificate: x509.Certificate
    context: ssl.SSLContext
    refresh_at: datetime


def _names(host: str) -> tuple[x509.GeneralName, str | None]:
    """The SAN entry for ``host`` and its subject CN (None when longer than 64)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return x509.IPAddress(address), str(address)
    name = host.lower().removesuffix(".")
    try:
        ascii_name = name.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"'{host}' cannot be put in a certificate") from None
    if not ascii_name:
        raise ValueError("an empty host cannot be put in a certificate")
    return x509.DNSName(ascii_name), ascii_name if len(ascii_name) <= _MAX_CN else None


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_id(ca: InterceptionCA) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _load_cert(path: Path) -> x509.Certificate:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CAError(
            f"cannot read CA certificate '{path}' ({_reason(exc)}); "
            f"check the path, or create a new CA"
        ) from None
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CAError(
            f"'{path}' is not a PEM certificate; expected '-----BEGIN CERTIFICATE-----'"
        ) from None
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CAError(
            f"'{path}' is not a CA certificate (BasicConstraints CA:TRUE is missing); "
            f"use a CA certificate, or create a new CA"
        )
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        raise CAError(
            f"'{path}' may not sign certificates (KeyUsage lacks keyCertSign); "
            f"use a CA certificate, or create a new CA"
        )
    return cert


def _load_key(path: Path) -> CAKey:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise CAError(
            f"cannot read CA key '{path}' ({_reason(exc)}); check the path and its owner"
        ) from None
    with os.fdopen(fd, "rb") as file:
        mode = os.fstat(file.fileno()).st_mode
        if mode & 0o077:
            raise CAError(
                f"CA key '{path}' is accessible by group or others "
                f"(mode {mode & 0o777:04o}); run: chmod 600 {path}"
            )
        data = file.read()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CAError(
            f"CA key '{path}' is encrypted; store it unencrypted with mode 0600 "
            f"(openssl pkey -in {path} -out <new file>)"
        ) from None
    except ValueError:
        raise CAError(
            f"'{path}' is not a PEM private key; expected '-----BEGIN PRIVATE KEY-----'"
        ) from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < _MIN_RSA_BITS:
            raise CAError(f"CA key '{path}' is RSA {key.key_size}; use at least 2048 bits")
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name not in _CURVES:
            raise CAError(f"CA key '{path}' is on {key.curve.name}; use P-256, P-384 or P-521")
        return key
    raise CAError(f"CA key '{path}' must be an RSA or EC key")


def _create(path: Path, data: bytes, mode: int) -> None:
    """Write a new file with ``mode`` from creation; never follow or replace a file."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    except FileExistsError:
        raise CAError(f"'{path}' already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise CAError(f"cannot create '{path}' ({_reason(exc)})") from None
    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), mode)  # exact mode, whatever the umask
        file.write(data)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _utcnow() -> datetime:
    return datetime.now(UTC)
