"""RouteTable.match: precedence, ports, path prefixes."""

from __future__ import annotations

import pytest

from m2m_proxy.config import CredentialSpec, RouteConfig, parse_config
from m2m_proxy.routing import RouteTable
from m2m_proxy.target import Target, parse_target


def route(name: str, host: str, *, port: int | None = None, prefix: str = "") -> RouteConfig:
    return RouteConfig(
        name=name,
        host=host,
        port=port,
        path_prefix=prefix,
        credential=CredentialSpec(client=name),
    )


def matched(table: RouteTable, url: str) -> str | None:
    found = table.match(parse_target(url, None))
    return None if found is None else found.name


def test_exact_host_matches_and_other_hosts_do_not() -> None:
    table = RouteTable([route("api", "api.example.com")])
    assert matched(table, "http://api.example.com/x") == "api"
    assert matched(table, "http://other.example.com/x") is None
    assert matched(table, "http://example.com/x") is None


def test_empty_table_matches_nothing() -> None:
    assert matched(RouteTable([]), "http://api.example.com/") is None


def test_exact_host_beats_a_wildcard_whatever_the_order() -> None:
    routes = [route("wild", "*.example.com"), route("exact", "api.example.com")]
    for ordered in (routes, routes[::-1]):
        table = RouteTable(ordered)
        assert matched(table, "http://api.example.com/") == "exact"
        assert matched(table, "http://web.example.com/") == "wild"


def test_longer_wildcard_beats_a_shorter_one_whatever_the_order() -> None:
    routes = [route("short", "*.example.com"), route("long", "*.eu.example.com")]
    for ordered in (routes, routes[::-1]):
        table = RouteTable(ordered)
        assert matched(table, "http://api.eu.example.com/") == "long"
        assert matched(table, "http://a.b.eu.example.com/") == "long"
        assert matched(table, "http://api.us.example.com/") == "short"


def test_wildcard_does_not_match_its_own_apex() -> None:
    table = RouteTable([route("wild", "*.example.com")])
    assert matched(table, "http://example.com/") is None
    assert matched(table, "http://deep.sub.example.com/") == "wild"
    assert matched(table, "http://notexample.com/") is None


def test_longest_matching_path_prefix_wins_whatever_the_order() -> None:
    routes = [
        route("root", "api.example.com"),
        route("v1", "api.example.com", prefix="/v1"),
        route("v1-admin", "api.example.com", prefix="/v1/admin"),
    ]
    for ordered in (routes, routes[::-1]):
        table = RouteTable(ordered)
        assert matched(table, "http://api.example.com/v1/admin/users") == "v1-admin"
        assert matched(table, "http://api.example.com/v1/orders") == "v1"
        assert matched(table, "http://api.example.com/v2") == "root"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1", "v1"),
        ("/v1/", "v1"),
        ("/v1/x", "v1"),
        ("/v1?q=1", "v1"),
        ("/v10", None),
        ("/v1x/y", None),
        ("/V1", None),
        ("/", None),
    ],
)
def test_path_prefixes_match_whole_segments(path: str, expected: str | None) -> None:
    table = RouteTable([route("v1", "api.example.com", prefix="/v1")])
    assert matched(table, "http://api.example.com" + path) == expected


def test_exact_host_whose_prefixes_miss_falls_back_to_a_wildcard() -> None:
    table = RouteTable(
        [route("exact-v1", "api.example.com", prefix="/v1"), route("wild", "*.example.com")]
    )
    assert matched(table, "http://api.example.com/v1/x") == "exact-v1"
    assert matched(table, "http://api.example.com/v2/x") == "wild"


def test_longer_wildcard_whose_prefixes_miss_falls_back_to_a_shorter_one() -> None:
    table = RouteTable(
        [route("long-v1", "*.eu.example.com", prefix="/v1"), route("short", "*.example.com")]
    )
    assert matched(table, "http://a.eu.example.com/v1") == "long-v1"
    assert matched(table, "http://a.eu.example.com/v2") == "short"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://api.example.com/", "api"),
        ("https://api.example.com/", "api"),
        ("http://api.example.com:80/", "api"),
        ("https://api.example.com:443/", "api"),
        ("http://api.example.com:8080/", None),
        ("http://api.example.com:443/", None),
        ("https://api.example.com:80/", None),
    ],
)
def test_route_without_a_port_matches_only_the_scheme_default_port(
    url: str, expected: str | None
) -> None:
    assert matched(RouteTable([route("api", "api.example.com")]), url) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://api.example.com:8443/", "api-8443"),
        ("https://api.example.com:8443/", "api-8443"),
        ("https://api.example.com/", None),
        ("http://api.example.com/", None),
    ],
)
def test_route_with_a_port_matches_that_port_for_either_scheme(
    url: str, expected: str | None
) -> None:
    table = RouteTable([route("api-8443", "api.example.com", port=8443)])
    assert matched(table, url) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [("https://api.example.com/", "api-443"), ("http://api.example.com:443/", "api-443")],
)
def test_route_with_a_default_port_matches_it_explicit_or_implied(url: str, expected: str) -> None:
    table = RouteTable([route("api-443", "api.example.com", port=443)])
    assert matched(table, url) == expected
    assert matched(table, "http://api.example.com/") is None


def test_same_host_on_two_ports_routes_each_port_to_its_route() -> None:
    table = RouteTable(
        [route("default", "api.example.com"), route("alt", "api.example.com", port=8443)]
    )
    assert matched(table, "https://api.example.com/") == "default"
    assert matched(table, "https://api.example.com:8443/") == "alt"
    assert matched(table, "https://api.example.com:9443/") is None


def test_wildcard_with_a_port_checks_the_port() -> None:
    table = RouteTable([route("wild", "*.example.com", port=8443)])
    assert matched(table, "https://a.example.com:8443/") == "wild"
    assert matched(table, "https://a.example.com/") is None


def test_target_host_case_trailing_dot_and_default_port_do_not_change_the_match() -> None:
    table = RouteTable([route("api", "api.example.com")])
    for url in (
        "http://API.EXAMPLE.COM/",
        "http://api.example.com./",
        "HTTP://Api.Example.Com.:80/",
    ):
        assert matched(table, url) == "api", url


def test_origin_form_requests_route_by_their_host_header() -> None:
    table = RouteTable([route("api", "api.example.com", prefix="/v1")])
    assert table.match(parse_target("/v1/x", "API.example.com.")) is not None
    assert table.match(parse_target("/v1/x", "other.example.com")) is None


def test_ipv6_literal_host_matches_exactly() -> None:
    table = RouteTable([route("v6", "::1", port=8080)])
    assert table.match(Target("http", "::1", 8080, "/")) is not None
    assert table.match(Target("http", "::2", 8080, "/")) is None


def test_routes_from_a_config_file_match_after_normalisation() -> None:
    config = parse_config(
        "clients:\n"
        "  c:\n"
        "    token_url: https://idp.example.com/t\n"
        "    client_id: a\n"
        "    client_secret: s\n"
        "routes:\n"
        "  - {host: 'API.Example.com.', path_prefix: /v1/, client: c, name: api}\n"
        "  - {host: '*.Example.com', client: c, name: wild}\n",
        "r.yaml",
        {},
    )
    table = RouteTable(config.routes)
    assert matched(table, "http://api.example.com/v1") == "api"
    assert matched(table, "http://api.example.com/v2") == "wild"
    assert matched(table, "http://x.example.com/v1") == "wild"
