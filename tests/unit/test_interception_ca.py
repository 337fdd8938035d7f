"""The interception CA on disk, and leaf certificates checked by real TLS handshakes."""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import stat
import tempfile
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from m2m_proxy.interception_ca import (
    CAError,
    CAFiles,
    InterceptionCA,
    LeafCertificates,
    init_ca,
    load_ca,
)

NOW = datetime.now(UTC).replace(microsecond=0)
DER = serialization.Encoding.DER
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


class Clock:
    def __init__(self, now: datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def ca_files(tmp_path: Path) -> CAFiles:
    return init_ca(tmp_path / "ca", now=NOW)


@pytest.fixture
def ca(ca_files: CAFiles) -> InterceptionCA:
    return load_ca(ca_files.cert_file, ca_files.key_file)


def handshake(
    context: ssl.SSLContext, cafile: Path, host: str, *, strict: bool = True
) -> tuple[bytes, str | None]:
    """Serve ``context`` on one end of a socketpair and verify it from the other end.

    Returns the leaf (DER) the client accepted and the ALPN protocol it negotiated;
    raises the client's ``ssl`` error when verification fails.
    """
    client_context = ssl.create_default_context(cafile=str(cafile))
    if strict:  # Python 3.13's default: the CA needs KeyUsage and SKI, the leaf AKI
        client_context.verify_flags |= ssl.VERIFY_X509_STRICT
    client_context.set_alpn_protocols(["h2", "http/1.1"])
    server_end, client_end = socket.socketpair()
    with server_end, client_end, ThreadPoolExecutor(1) as pool:
        server_end.settimeout(5)
        client_end.settimeout(5)
        served = pool.submit(_serve, context, server_end)
        try:
            with client_context.wrap_socket(client_end, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
                alpn = tls.selected_alpn_protocol()
        finally:
            served.result()
    assert der is not None
    return der, alpn


def _serve(context: ssl.SSLContext, sock: socket.socket) -> None:
    try:
        with context.wrap_socket(sock, server_side=True):
            pass
    except (ssl.SSLError, OSError):
        pass  # the client refused the certificate; the client side reports it


def sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


def write_user_ca(
    directory: Path,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    *,
    is_ca: bool | None = True,
    key_id: bytes | None = b"corp-root-key-id",
) -> CAFiles:
    """A CA made elsewhere, key in traditional PEM. ``is_ca=None``: no BasicConstraints."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Corp Root")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=30))
    )
    if is_ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=is_ca, path_length=None), critical=True
        ).add_extension(  # strict verifiers (Python 3.13+ clients) require KeyUsage on a CA
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if key_id is not None:  # not derived from the key: leaves must copy it, not recompute it
        builder = builder.add_extension(x509.SubjectKeyIdentifier(key_id), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    directory.mkdir(exist_ok=True)
    files = CAFiles(directory / "root.crt", directory / "root.key")
    files.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    files.key_file.chmod(0o600)
    return files


# --- init_ca -------------------------------------------------------------------------


def test_init_ca_writes_a_ca_with_a_private_key(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "ca"
    files = init_ca(directory, common_name="Test CA", valid_days=10, now=NOW)

    assert files == CAFiles(directory / "ca.pem", directory / "ca-key.pem")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(files.key_file.stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(files.cert_file.read_bytes())
    assert cert.subject.rfc4514_string() == "CN=Test CA"
    assert cert.issuer == cert.subject
    assert cert.not_valid_after_utc == NOW + timedelta(days=10)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert (constraints.value.ca, constraints.value.path_length) == (True, 0)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign
    assert not usage.value.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.NameConstraints)
    key_pem = files.key_file.read_bytes()
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8, unencrypted
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    cert.verify_directly_issued_by(cert)


def test_init_ca_key_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        files = init_ca(tmp_path)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(files.key_file.stat().st_mode) == 0o600


@pytest.mark.parametrize("existing", ["ca.pem", "ca-key.pem"])
def test_init_ca_never_overwrites(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).write_bytes(b"keep me")

    with pytest.raises(CAError, match=rf"'{tmp_path / existing}' already exists.*move both"):
        init_ca(tmp_path)

    assert (tmp_path / existing).read_bytes() == b"keep me"
    assert [p.name for p in tmp_path.iterdir()] == [existing]


def test_init_ca_round_trips_through_load_ca(ca_files: CAFiles) -> None:
    ca = load_ca(str(ca_files.cert_file), str(ca_files.key_file))
    assert ca.certificate.subject.rfc4514_string() == "CN=m2m-proxy interception CA"


# --- load_ca -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_load_ca_refuses_a_key_open_to_others(ca_files: CAFiles, mode: int) -> None:
    ca_files.key_file.chmod(mode)
    with pytest.raises(CAError, match=f"chmod 600 {ca_files.key_file}$"):
        load_ca(ca_files.cert_file, ca_files.key_file)


def test_load_ca_accepts_a_read_only_key(ca_files: CAFiles) -> None:
    ca_files.key_file.chmod(0o400)
    load_ca(ca_files.cert_file, ca_files.key_file)


@pytest.mark.parametrize("which", ["cert_file", "key_file"])
def test_load_ca_names_a_missing_file(ca_files: CAFiles, tmp_path: Path, which: str) -> None:
    missing = tmp_path / "nowhere.pem"
    paths = {"cert_file": ca_files.cert_file, "key_file": ca_files.key_file, which: missing}
    with pytest.raises(CAError, match=f"cannot read CA .*'{missing}'.*check the path"):
        load_ca(**paths)


def test_load_ca_refuses_a_file_that_is_not_pem(ca_files: CAFiles) -> None:
    with pytest.raises(CAError, match=f"'{ca_files.key_file}' is not a PEM certificate"):
        load_ca(ca_files.key_file, ca_files.key_file)


@pytest.mark.parametrize("is_ca", [False, None])
def test_load_ca_refuses_a_certificate_that_is_not_a_ca(tmp_path: Path, is_ca: bool | None) -> None:
    files = write_user_ca(tmp_path, ec.generate_private_key(ec.SECP256R1()), is_ca=is_ca)
    with pytest.raises(CAError, match=f"'{files.cert_file}' is not a CA certificate"):
        load_ca(files.cert_file, files.key_file)


def test_load_ca_refuses_a_key_of_another_ca(tmp_path: Path) -> None:
    first, second = init_ca(tmp_path / "a"), init_ca(tmp_path / "b")
    with pytest.raises(
        CAError, match=f"'{second.key_file}' is not the private key of '{first.cert_file}'"
    ):
        load_ca(first.cert_file, second.key_file)


def test_load_ca_refuses_an_expired_ca(tmp_path: Path) -> None:
    files = init_ca(tmp_path, valid_days=30, now=NOW - timedelta(days=31))
    with pytest.raises(CAError, match=f"'{files.cert_file}' expired on .*create a new CA"):
        load_ca(files.cert_file, files.key_file)


def test_load_ca_refuses_a_ca_not_yet_valid(tmp_path: Path) -> None:
    files = init_ca(tmp_path, now=NOW + timedelta(days=2))
    with pytest.raises(CAError, match=f"'{files.cert_file}' is not valid until .*clock"):
        load_ca(files.cert_file, files.key_file)


def test_load_ca_refuses_an_encrypted_key(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    files = write_user_ca(tmp_path, key)
    files.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(CAError, match=f"'{files.key_file}' is encrypted"):
        load_ca(files.cert_file, files.key_file)


def test_interception_ca_repr_hides_the_key(ca: InterceptionCA) -> None:
    assert "key" not in repr(ca)
    assert repr(ca.key) not in repr(ca)


# --- leaf certificates ---------------------------------------------------------------


@pytest.mark.parametrize("host", ["api.example.com", "127.0.0.1", "::1"])
def test_leaf_verifies_against_the_ca_in_a_tls_handshake(
    ca: InterceptionCA, ca_files: CAFiles, host: str
) -> None:
    with LeafCertificates(ca) as leaves:
        der, alpn = handshake(leaves.server_context(host), ca_files.cert_file, host)
        assert x509.load_der_x509_certificate(der) == leaves.certificate(host)
    assert alpn == "http/1.1"


def test_leaf_for_another_host_fails_verification(ca: InterceptionCA, ca_files: CAFiles) -> None:
    with LeafCertificates(ca) as leaves:
        context = leaves.server_context("api.example.com")
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            handshake(context, ca_files.cert_file, "evil.example.com")
        with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
            handshake(leaves.server_context("127.0.0.1"), ca_files.cert_file, "127.0.0.2")


def test_leaf_from_another_ca_fails_verification(ca: InterceptionCA, tmp_path: Path) -> None:
    other = init_ca(tmp_path / "other")
    with (
        LeafCertificates(ca) as leaves,
        # The server sends leaf + CA; an untrusted CA is reported as such.
        pytest.raises(ssl.SSLCertVerificationError, match="self-signed certificate in cert"),
    ):
        handshake(leaves.server_context("api.example.com"), other.cert_file, "api.example.com")


def test_leaf_content_for_a_name(ca: InterceptionCA) -> None:
    with LeafCertificates(ca, validity=timedelta(hours=6), clock=Clock()) as leaves:
        cert = leaves.certificate("API.Example.com.")
    assert sans(cert) == [x509.DNSName("api.example.com")]
    assert cert.subject.rfc4514_string() == "CN=api.example.com"
    assert cert.issuer == ca.certificate.subject
    assert cert.not_valid_before_utc == NOW - timedelta(hours=1)
    assert cert.not_valid_after_utc == NOW + timedelta(hours=6)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert not constraints.value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    cert.verify_directly_issued_by(ca.certificate)


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", ipaddress.IPv4Address("127.0.0.1")),
        ("::1", ipaddress.IPv6Address("::1")),
        ("2001:db8::1", ipaddress.IPv6Address("2001:db8::1")),
    ],
)
def test_leaf_for_an_ip_literal_has_an_ip_san(
    ca: InterceptionCA, host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address
) -> None:
    with LeafCertificates(ca) as leaves:
        cert = leaves.certificate(host)
    assert sans(cert) == [x509.IPAddress(address)]


def test_leaf_for_an_international_name_uses_idna(ca: InterceptionCA, ca_files: CAFiles) -> None:
    with LeafCertificates(ca) as leaves:
        handshake(leaves.server_context("bücher.example"), ca_files.cert_file, "bücher.example")
        assert sans(leaves.certificate("bücher.example")) == [x509.DNSName("xn--bcher-kva.example")]


def test_leaf_for_a_long_name_has_no_cn_and_still_verifies(
    ca: InterceptionCA, ca_files: CAFiles
) -> None:
    host = "a" * 60 + ".example.com"
    with LeafCertificates(ca) as leaves:
        handshake(leaves.server_context(host), ca_files.cert_file, host)
        cert = leaves.certificate(host)
    assert len(cert.subject) == 0
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
    assert sans(cert) == [x509.DNSName(host)]


@pytest.mark.parametrize("host", ["", "a..b", "x" * 64 + ".example.com"])
def test_leaf_refuses_a_host_that_is_not_a_name(ca: InterceptionCA, host: str) -> None:
    with LeafCertificates(ca) as leaves, pytest.raises(ValueError, match="certificate"):
        leaves.server_context(host)


def test_server_context_is_tls12_or_later(ca: InterceptionCA) -> None:
    with LeafCertificates(ca) as leaves:
        context = leaves.server_context("api.example.com")
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_all_leaves_share_one_key(ca: InterceptionCA, ca_files: CAFiles) -> None:
    with LeafCertificates(ca) as leaves:
        first, _ = handshake(leaves.server_context("a.example"), ca_files.cert_file, "a.example")
        second, _ = handshake(leaves.server_context("b.example"), ca_files.cert_file, "b.example")
    a, b = x509.load_der_x509_certificate(first), x509.load_der_x509_certificate(second)
    assert a.serial_number != b.serial_number
    assert a.public_key().public_bytes(DER, SPKI) == b.public_key().public_bytes(DER, SPKI)
    key = a.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"
    with LeafCertificates(ca) as other:
        assert other.certificate("a.example").public_key() != a.public_key()


def test_leaf_never_outlives_the_ca(tmp_path: Path) -> None:
    files = init_ca(tmp_path, valid_days=2)
    ca = load_ca(files.cert_file, files.key_file)
    with LeafCertificates(ca, validity=timedelta(days=30)) as leaves:
        cert = leaves.certificate("api.example.com")
    assert cert.not_valid_after_utc == ca.certificate.not_valid_after_utc


def test_leaf_is_not_minted_after_the_ca_expired(ca: InterceptionCA) -> None:
    clock = Clock(ca.certificate.not_valid_after_utc)
    with LeafCertificates(ca, clock=clock) as leaves, pytest.raises(CAError, match="expired"):
        leaves.server_context("api.example.com")


def test_cached_context_is_reused_until_near_expiry(ca: InterceptionCA) -> None:
    clock = Clock()
    with LeafCertificates(ca, validity=timedelta(hours=10), clock=clock) as leaves:
        first = leaves.server_context("api.example.com")
        first_cert = leaves.certificate("api.example.com")
        clock.now = NOW + timedelta(hours=8, minutes=59)  # 1 h 1 min left: over 10 %
        assert leaves.server_context("api.example.com") is first
        assert leaves.minted == 1

        clock.now = NOW + timedelta(hours=9)  # 1 h left: the last 10 %
        second = leaves.server_context("api.example.com")
        second_cert = leaves.certificate("api.example.com")
    assert second is not first
    assert leaves.minted == 2
    assert second_cert.serial_number != first_cert.serial_number
    assert second_cert.not_valid_after_utc == NOW + timedelta(hours=19)


def test_lru_evicts_the_least_recently_used_host(ca: InterceptionCA) -> None:
    with LeafCertificates(ca, max_entries=2) as leaves:
        a = leaves.server_context("a.example")
        leaves.server_context("b.example")
        assert leaves.server_context("a.example") is a  # a is now the most recent
        leaves.server_context("c.example")  # evicts b
        assert len(leaves) == 2
        assert leaves.minted == 3

        assert leaves.server_context("a.example") is a
        assert leaves.minted == 3
        leaves.server_context("b.example")  # minted again; evicts c
        assert leaves.minted == 4
        assert len(leaves) == 2


def test_leaf_files_live_in_a_private_directory_removed_on_close(
    ca: InterceptionCA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    leaves = LeafCertificates(ca)
    [directory] = scratch.iterdir()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700

    leaves.server_context("api.example.com")
    assert list(directory.iterdir()) == []  # the key and chain are removed once loaded

    leaves.close()
    assert list(scratch.iterdir()) == []
    assert len(leaves) == 0
    with pytest.raises(RuntimeError, match="closed"):
        leaves.server_context("api.example.com")
    leaves.close()  # idempotent


@pytest.mark.parametrize("kind", ["rsa-2048", "ec-p384"])
def test_user_provided_ca_signs_leaves(tmp_path: Path, kind: str) -> None:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = (
        rsa.generate_private_key(65537, 2048)
        if kind == "rsa-2048"
        else ec.generate_private_key(ec.SECP384R1())
    )
    files = write_user_ca(tmp_path, key)
    ca = load_ca(files.cert_file, files.key_file)
    with LeafCertificates(ca) as leaves:
        der, _ = handshake(
            leaves.server_context("api.example.com"), files.cert_file, "api.example.com"
        )
    cert = x509.load_der_x509_certificate(der)
    cert.verify_directly_issued_by(ca.certificate)
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == b"corp-root-key-id"


def test_user_ca_without_a_key_id_gets_one_derived_from_its_key(tmp_path: Path) -> None:
    key = rsa.generate_private_key(65537, 2048)
    files = write_user_ca(tmp_path, key, key_id=None)
    ca = load_ca(files.cert_file, files.key_file)
    with LeafCertificates(ca) as leaves:
        # Strict verifiers refuse a CA without SKI; a default OpenSSL client accepts it.
        handshake(
            leaves.server_context("api.example.com"),
            files.cert_file,
            "api.example.com",
            strict=False,
        )
        cert = leaves.certificate("api.example.com")
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    expected = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    assert aki.key_identifier == expected.digest


def test_user_ca_with_a_weak_rsa_key_is_refused(tmp_path: Path) -> None:
    files = write_user_ca(tmp_path, rsa.generate_private_key(65537, 1024))  # noqa: S505 -- on purpose
    with pytest.raises(CAError, match="RSA 1024; use at least 2048"):
        load_ca(files.cert_file, files.key_file)
