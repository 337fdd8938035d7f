"""Host and port normalisation shared by config, routing and request parsing."""

from __future__ import annotations

import pytest

from m2m_proxy.authority import (
    AuthorityError,
    canonical_port,
    effective_port,
    is_loopback,
    normalize_host,
    parse_port,
    secure_or_loopback,
    split_authority,
)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("API.Example.COM", "api.example.com"),
        ("api.example.com.", "api.example.com"),
        ("svc_internal", "svc_internal"),
        ("[::1]", "::1"),
        ("[2001:DB8::0001]", "2001:db8::1"),
        ("2001:db8:0:0::1", "2001:db8::1"),
        ("127.0.0.1", "127.0.0.1"),
    ],
)
def test_hosts_are_normalised(host: str, expected: str) -> None:
    assert normalize_host(host) == expected


@pytest.mark.parametrize(
    "host",
    ["", ".", "a..", "a b", "user@host", "exämple.com", "-a.com", "a.-b.com", "[::g]", "a" * 254],
)
def test_invalid_hosts_are_refused(host: str) -> None:
    with pytest.raises(AuthorityError):
        normalize_host(host)


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("Host.Example:8080", ("host.example", 8080)),
        ("host.example", ("host.example", None)),
        ("[::1]:443", ("::1", 443)),
        ("[::1]", ("::1", None)),
        ("host.example.:80", ("host.example", 80)),
    ],
)
def test_split_authority(authority: str, expected: tuple[str, int | None]) -> None:
    assert split_authority(authority) == expected


@pytest.mark.parametrize(
    ("authority", "message"),
    [
        ("[::1", "'[::1' has an unclosed '['"),
        ("[::1]x", "'[::1]x' has text after the IPv6 address"),
        ("host:", "port '' must be a number from 1 to 65535"),
        ("host:0", "port '0' must be a number from 1 to 65535"),
        ("host:65536", "port '65536' must be a number from 1 to 65535"),
        ("host:-1", "port '-1' must be a number from 1 to 65535"),
    ],
)
def test_split_authority_refusals_say_why(authority: str, message: str) -> None:
    with pytest.raises(AuthorityError) as info:
        split_authority(authority)
    assert str(info.value) == message


def test_port_zero_is_allowed_only_when_asked_for() -> None:
    assert split_authority("127.0.0.1:0", allow_zero=True) == ("127.0.0.1", 0)
    assert parse_port("0", allow_zero=True) == 0
    with pytest.raises(AuthorityError):
        parse_port("0")


@pytest.mark.parametrize("text", ["²", "①", "٣"], ids=["superscript", "circled", "arabic-indic"])
def test_non_ascii_digits_are_refused_as_an_authority_error(text: str) -> None:
    with pytest.raises(AuthorityError):
        parse_port(text)


def test_ports_with_leading_zeros_and_the_bounds_parse() -> None:
    assert [parse_port(p) for p in ("1", "0080", "65535")] == [1, 80, 65535]


def test_default_ports_canonicalise_to_none_per_scheme() -> None:
    assert canonical_port("http", 80) is None
    assert canonical_port("https", 443) is None
    assert canonical_port("http", 443) == 443
    assert canonical_port("https", 80) == 80
    assert canonical_port("https", None) is None
    assert effective_port("https", None) == 443
    assert effective_port("http", None) == 80
    assert effective_port("http", 8080) == 8080


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("api.localhost", True),
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("localhost.example.com", False),
        ("10.0.0.1", False),
        ("0.0.0.0", False),
        ("::", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("scheme", "host", "allowed"),
    [
        ("https", "idp.example.com", True),
        ("http", "127.0.0.1", True),
        ("http", "localhost", True),
        ("http", "idp.example.com", False),
        ("http", None, False),
        ("ftp", "127.0.0.1", False),
    ],
)
def test_idp_urls_are_https_or_loopback(scheme: str, host: str | None, allowed: bool) -> None:
    assert secure_or_loopback(scheme, host) is allowed
