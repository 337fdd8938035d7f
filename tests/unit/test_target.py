"""parse_target: request-target + Host → where the request goes, or a 400."""

from __future__ import annotations

import pytest

from m2m_proxy.errors import BadRequestError
from m2m_proxy.target import Target, parse_target


def test_origin_form_takes_the_host_from_the_host_header() -> None:
    assert parse_target("/v1/orders?id=7", "api.example.com") == Target(
        "http", "api.example.com", None, "/v1/orders?id=7"
    )


def test_absolute_form_wins_over_a_conflicting_host_header() -> None:
    target = parse_target("http://api.example.com/v1", "evil.example.net")
    assert (target.host, target.path_qs) == ("api.example.com", "/v1")


def test_absolute_form_https_keeps_the_https_scheme() -> None:
    assert parse_target("https://api.example.com/x", None) == Target(
        "https", "api.example.com", None, "/x"
    )


def test_scheme_and_host_case_are_normalised_but_the_path_is_not() -> None:
    assert parse_target("HTTPS://API.Example.COM./Path/To?Q=A", None) == Target(
        "https", "api.example.com", None, "/Path/To?Q=A"
    )


@pytest.mark.parametrize(
    ("raw", "path_qs"),
    [
        ("http://api.example.com", "/"),
        ("http://api.example.com?x=1", "/?x=1"),
        ("http://api.example.com/a%2Fb?q=%20", "/a%2Fb?q=%20"),
    ],
)
def test_absolute_form_path_is_kept_byte_for_byte_with_a_leading_slash(
    raw: str, path_qs: str
) -> None:
    assert parse_target(raw, None).path_qs == path_qs


@pytest.mark.parametrize(
    ("raw", "host", "port"),
    [
        ("http://api.example.com:80/", "api.example.com", None),
        ("https://api.example.com:443/", "api.example.com", None),
        ("http://api.example.com:443/", "api.example.com", 443),
        ("https://api.example.com:80/", "api.example.com", 80),
        ("http://api.example.com:8080/", "api.example.com", 8080),
    ],
)
def test_default_ports_are_canonicalised_to_none(raw: str, host: str, port: int | None) -> None:
    target = parse_target(raw, None)
    assert (target.host, target.port) == (host, port)


def test_origin_form_host_header_port_is_canonicalised_for_http() -> None:
    assert parse_target("/", "api.example.com:80").port is None
    assert parse_target("/", "api.example.com:8080").port == 8080


@pytest.mark.parametrize(
    ("raw", "host_header", "host", "port", "authority"),
    [
        ("http://[::1]:8080/x", None, "::1", 8080, "[::1]:8080"),
        ("http://[2001:DB8::1]/x", None, "2001:db8::1", None, "[2001:db8::1]"),
        ("/x", "[::1]:8080", "::1", 8080, "[::1]:8080"),
    ],
)
def test_ipv6_literals_are_unbracketed_and_rebracketed_in_the_authority(
    raw: str, host_header: str | None, host: str, port: int | None, authority: str
) -> None:
    target = parse_target(raw, host_header)
    assert (target.host, target.port, target.authority) == (host, port, authority)


def test_target_path_excludes_the_query() -> None:
    assert parse_target("/a/b?c=/d", "h.example").path == "/a/b"


@pytest.mark.parametrize(
    ("raw", "host_header"),
    [
        ("http://user:pw@api.example.com/", None),
        ("http://user@api.example.com/", None),
        ("/x", "user@api.example.com"),
    ],
)
def test_userinfo_is_refused(raw: str, host_header: str | None) -> None:
    with pytest.raises(BadRequestError) as info:
        parse_target(raw, host_header)
    assert "user information" in info.value.detail
    assert info.value.status == 400


@pytest.mark.parametrize(
    "raw",
    [
        "/v1/../admin",
        "/v1/./x",
        "/..",
        "/v1/%2e%2e/admin",
        "/v1/%2E%2E/admin",
        "/v1/.%2e/admin",
        "/v1/%2e/x",
        "http://api.example.com/v1/../admin",
    ],
)
def test_dot_segments_are_refused_also_when_percent_encoded(raw: str) -> None:
    with pytest.raises(BadRequestError) as info:
        parse_target(raw, "api.example.com")
    assert info.value.detail == "the path contains '.' or '..' segments; send the normalised path"


@pytest.mark.parametrize("raw", ["/v1/..x", "/v1/.well-known/x", "/a?next=/../b", "/%2e%2ex"])
def test_dots_that_are_not_whole_segments_are_accepted(raw: str) -> None:
    assert parse_target(raw, "api.example.com").path_qs == raw


@pytest.mark.parametrize("host_header", [None, ""])
def test_origin_form_without_a_host_header_is_refused(host_header: str | None) -> None:
    with pytest.raises(BadRequestError) as info:
        parse_target("/x", host_header)
    assert info.value.detail == (
        "the request has no Host header; send one or use an absolute URL (http://host/path)"
    )


@pytest.mark.parametrize("raw", ["ftp://api.example.com/", "api.example.com/x", "*", ""])
def test_targets_that_are_neither_http_urls_nor_paths_are_refused(raw: str) -> None:
    with pytest.raises(BadRequestError) as info:
        parse_target(raw, "api.example.com")
    assert info.value.detail == (
        "the request target must be an http:// or https:// URL or a path starting with '/'"
    )


def test_a_fragment_is_refused() -> None:
    with pytest.raises(BadRequestError):
        parse_target("/x#frag", "api.example.com")


@pytest.mark.parametrize(
    ("raw", "host_header"),
    [
        ("http://bad host/", None),
        ("http://api.example.com:99999/", None),
        ("http://[::1/", None),
        ("/x", "api.example.com:port"),
        ("/x", "api.example.com:²"),
    ],
    ids=["space", "port-range", "unclosed-ipv6", "port-text", "port-non-ascii-digit"],
)
def test_a_bad_host_or_port_is_a_bad_request(raw: str, host_header: str | None) -> None:
    with pytest.raises(BadRequestError) as info:
        parse_target(raw, host_header)
    assert info.value.detail.startswith("bad target host: ")
