"""parse_config / load_config: the routes file contract and its error messages."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path

import pytest
import trustme

from m2m_proxy.config import (
    Address,
    AuthMethod,
    ClientConfig,
    Config,
    ConfigError,
    HttpsMode,
    Origin,
    Unmatched,
    load_config,
    parse_config,
)
from m2m_proxy.config.schema import ProxySection
from m2m_proxy.interception_ca import init_ca
from tests.pki import CertFiles, issue

ENV = {"ORDERS_SECRET": "s3cret-value"}

CLIENTS = """\
clients:
  orders:
    token_url: https://idp.example.com/oauth2/token
    client_id: orders-id
    client_secret: ${ORDERS_SECRET}
"""


def load(text: str, environ: Mapping[str, str] = ENV) -> Config:
    return parse_config(textwrap.dedent(text), "routes.yaml", environ)


def problems(text: str, environ: Mapping[str, str] = ENV) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(text, environ)
    assert str(info.value) == "\n".join(str(p) for p in info.value.problems)
    return [str(p) for p in info.value.problems]


def secret_of(client: ClientConfig) -> str:
    assert client.client_secret is not None
    return client.client_secret.value


def with_route(route: str) -> str:
    """CLIENTS plus one route; ``route`` is the route's lines, indented by 4."""
    return CLIENTS + "routes:\n  - " + textwrap.indent(textwrap.dedent(route), "    ")[4:]


def with_client(client: str) -> str:
    """One client 'orders' with the given body (indented by 4) and one route to it."""
    body = textwrap.indent(textwrap.dedent(client), "    ")
    return (
        "clients:\n  orders:\n" + body + "routes:\n  - host: api.example.com\n    client: orders\n"
    )


# --- a valid file --------------------------------------------------------------------


def test_valid_file_builds_the_runtime_config() -> None:
    config = load(
        with_route(
            """\
            host: api.example.com
            client: orders
            scope: write:shipments read:orders
            audience: https://api.example.com
            """
        )
    )
    assert config.source == "routes.yaml"
    assert config.proxy.listen == Address("127.0.0.1", 8080)
    assert config.proxy.admin_listen == Address("127.0.0.1", 9901)
    assert config.proxy.unmatched is Unmatched.DENY
    client = config.clients["orders"]
    assert client.token_url == "https://idp.example.com/oauth2/token"
    assert client.client_id == "orders-id"
    assert secret_of(client) == "s3cret-value"
    assert client.auth_method is AuthMethod.CLIENT_SECRET_BASIC
    (route,) = config.routes
    assert route.name == "api.example.com"
    assert (route.host, route.port, route.path_prefix) == ("api.example.com", None, "")
    assert route.credential.client == "orders"
    assert route.credential.scope == ("read:orders", "write:shipments")
    assert route.credential.audience == "https://api.example.com"
    assert route.credential.resource is None
    assert route.upstream is None


def test_empty_file_gives_default_settings_and_no_routes() -> None:
    config = load("")
    assert config.proxy.listen == Address("127.0.0.1", 8080)
    assert config.proxy.unmatched is Unmatched.DENY
    assert config.clients == {}
    assert config.routes == ()


def test_listen_given_as_a_bare_port_binds_loopback() -> None:
    config = load("proxy:\n  listen: 8081\n  admin_listen: '[::1]:9902'\n")
    assert config.proxy.listen == Address("127.0.0.1", 8081)
    assert config.proxy.admin_listen == Address("::1", 9902)
    assert str(config.proxy.admin_listen) == "[::1]:9902"


def test_listen_without_a_port_is_refused() -> None:
    assert problems("proxy:\n  listen: 127.0.0.1\n") == [
        "routes.yaml:2:11: proxy.listen: '127.0.0.1' has no port; "
        "write host:port, e.g. 127.0.0.1:8080"
    ]


def test_listen_with_an_out_of_range_port_is_refused() -> None:
    assert problems("proxy:\n  listen: 127.0.0.1:70000\n") == [
        "routes.yaml:2:11: proxy.listen: port '70000' must be a number from 0 to 65535; "
        "write host:port, e.g. 127.0.0.1:8080"
    ]


def test_both_listeners_may_ask_for_any_free_port() -> None:
    config = load("proxy:\n  listen: 127.0.0.1:0\n  admin_listen: 127.0.0.1:0\n")
    assert config.proxy.listen == config.proxy.admin_listen == Address("127.0.0.1", 0)


def test_admin_listen_equal_to_listen_is_refused() -> None:
    assert problems("proxy:\n  listen: 127.0.0.1:8080\n  admin_listen: 127.0.0.1:8080\n") == [
        "routes.yaml:3:17: proxy.admin_listen: must differ from proxy.listen; "
        "pick another port, e.g. 127.0.0.1:9901"
    ]


def test_proxy_settings_of_the_wrong_type_name_the_field() -> None:
    assert problems("proxy:\n  connect_timeout_s: 0\n  unmatched: allow\n") == [
        "routes.yaml:2:22: proxy.connect_timeout_s: input should be greater than 0; fix the value",
        "routes.yaml:3:14: proxy.unmatched: input should be 'deny' or 'passthrough'; fix the value",
    ]


def test_a_union_typed_field_is_reported_once_under_its_own_path() -> None:
    # pydantic reports one error per union member ('listen.str', 'listen.int');
    # the user wrote 'proxy.listen' and should see that path, once.
    found = problems("proxy:\n  listen: [1, 2]\n")
    assert len(found) == 1
    assert found[0].startswith("routes.yaml:2:11: proxy.listen: ")


def test_missing_required_client_field_is_named() -> None:
    assert problems(with_client("token_url: https://idp.example.com/t\nclient_secret: x\n")) == [
        "routes.yaml:3:5: clients.orders.client_id: required field is missing; add it"
    ]


# --- unknown keys and names ----------------------------------------------------------


def test_unknown_top_level_key_suggests_the_close_one() -> None:
    assert problems("route: []\n") == [
        "routes.yaml:1:1: route: unknown key 'route'; did you mean 'routes'?"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "proxy:\n  listne: 127.0.0.1:8080\n",
            "routes.yaml:2:3: proxy.listne: unknown key 'listne'; did you mean 'listen'?",
        ),
        (
            with_client("token_url: https://idp.example.com/t\nclient_id: a\nclient_secert: x\n"),
            "routes.yaml:5:5: clients.orders.client_secert: unknown key 'client_secert'; "
            "did you mean 'client_secret'?",
        ),
        (
            with_route("hots: api.example.com\nhost: api.example.com\nclient: orders\n"),
            "routes.yaml:7:5: routes[0].hots: unknown key 'hots'; did you mean 'host'?",
        ),
    ],
    ids=["proxy", "client", "route"],
)
def test_unknown_nested_key_suggests_the_close_one(text: str, expected: str) -> None:
    assert expected in problems(text)


def test_unknown_key_without_a_close_match_lists_the_known_keys() -> None:
    [problem] = problems("proxy:\n  zzz: 1\n")
    prefix = "routes.yaml:2:3: proxy.zzz: unknown key 'zzz'; known keys: "
    assert problem.startswith(prefix)
    known = problem.removeprefix(prefix).split(", ")
    assert known == sorted(ProxySection.model_fields)
    assert {"admin_listen", "listen", "unmatched", "token_timeout_s"} <= set(known)


def test_unknown_client_name_suggests_the_close_one() -> None:
    assert problems(with_route("host: api.example.com\nclient: ordrs\n")) == [
        "routes.yaml:8:13: routes[0].client: unknown client 'ordrs'; did you mean 'orders'?"
    ]


def test_unknown_client_name_without_a_close_match_lists_the_clients() -> None:
    assert problems(with_route("host: api.example.com\nclient: billing\n")) == [
        "routes.yaml:8:13: routes[0].client: unknown client 'billing'; "
        "define it under clients: (orders)"
    ]


def test_route_to_a_client_when_no_clients_exist_says_where_to_define_it() -> None:
    assert problems("routes:\n  - host: api.example.com\n    client: orders\n") == [
        "routes.yaml:3:13: routes[0].client: unknown client 'orders'; "
        "define it under the top-level 'clients:' section"
    ]


# --- environment references ----------------------------------------------------------


def test_unset_environment_variable_is_named_with_its_fix() -> None:
    # One problem: the empty value it leaves behind is not reported a second time.
    assert problems(CLIENTS, environ={}) == [
        "routes.yaml:5:20: clients.orders.client_secret: environment variable ORDERS_SECRET "
        "is not set; export ORDERS_SECRET=... before starting, or write "
        "${ORDERS_SECRET:-default}"
    ]


def test_default_is_used_only_when_the_variable_is_unset() -> None:
    text = CLIENTS.replace("${ORDERS_SECRET}", "${ORDERS_SECRET:-fallback}")
    assert secret_of(load(text, environ={}).clients["orders"]) == "fallback"
    assert secret_of(load(text).clients["orders"]) == "s3cret-value"


def test_variable_set_to_empty_takes_the_default_as_in_the_shell() -> None:
    text = CLIENTS.replace("client_id: orders-id", "client_id: x${SUFFIX:-dflt}")
    assert load(text, environ={**ENV, "SUFFIX": ""}).clients["orders"].client_id == "xdflt"


def test_variable_set_to_empty_without_default_stays_empty() -> None:
    text = CLIENTS.replace("client_id: orders-id", "client_id: x${SUFFIX}")
    assert load(text, environ={**ENV, "SUFFIX": ""}).clients["orders"].client_id == "x"


def test_references_expand_inside_a_longer_string() -> None:
    text = CLIENTS.replace("client_id: orders-id", "client_id: id-${TENANT}-${ENVNAME}")
    config = load(text, environ={**ENV, "TENANT": "acme", "ENVNAME": "prod"})
    assert config.clients["orders"].client_id == "id-acme-prod"


def test_double_dollar_is_a_literal_dollar_and_not_a_reference() -> None:
    text = CLIENTS.replace("client_id: orders-id", "client_id: a$$b$${NOT_SET}")
    assert load(text).clients["orders"].client_id == "a$b${NOT_SET}"


def test_expanded_values_are_not_expanded_again() -> None:
    config = load(CLIENTS, environ={"ORDERS_SECRET": "${OTHER}", "OTHER": "no"})
    assert secret_of(config.clients["orders"]) == "${OTHER}"


def test_every_unset_variable_is_reported() -> None:
    text = CLIENTS.replace("client_id: orders-id", "client_id: ${ORDERS_ID}")
    assert [p.split(": ")[1] for p in problems(text, environ={})] == [
        "clients.orders.client_id",
        "clients.orders.client_secret",
    ]


# --- secrets --------------------------------------------------------------------------


def test_client_secret_file_is_read_and_its_trailing_newline_stripped(tmp_path: Path) -> None:
    secret = tmp_path / "orders.secret"
    secret.write_text("from-file-secret\n", encoding="utf-8")
    config = load(
        with_client(
            f"token_url: https://idp.example.com/t\nclient_id: a\nclient_secret_file: {secret}\n"
        )
    )
    assert secret_of(config.clients["orders"]) == "from-file-secret"


def test_unreadable_client_secret_file_is_named_with_the_reason(tmp_path: Path) -> None:
    missing = tmp_path / "missing.secret"
    assert problems(
        with_client(
            f"token_url: https://idp.example.com/t\nclient_id: a\nclient_secret_file: {missing}\n"
        )
    ) == [
        f"routes.yaml:5:25: clients.orders.client_secret_file: cannot read '{missing}': "
        "No such file or directory; check the path and that this user may read it"
    ]


def test_client_secret_file_that_is_a_directory_is_named_with_the_reason(tmp_path: Path) -> None:
    assert problems(
        with_client(
            f"token_url: https://idp.example.com/t\nclient_id: a\nclient_secret_file: {tmp_path}\n"
        )
    ) == [
        f"routes.yaml:5:25: clients.orders.client_secret_file: cannot read '{tmp_path}': "
        "Is a directory; check the path and that this user may read it"
    ]


def test_client_secret_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    binary = tmp_path / "binary.secret"
    binary.write_bytes(b"\xff\xfe\x00secret")
    assert problems(
        with_client(
            f"token_url: https://idp.example.com/t\nclient_id: a\nclient_secret_file: {binary}\n"
        )
    ) == [
        f"routes.yaml:5:25: clients.orders.client_secret_file: cannot read '{binary}': "
        "not UTF-8; check the path and that this user may read it"
    ]


def test_empty_client_secret_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.secret"
    empty.write_text("\n", encoding="utf-8")
    assert problems(
        with_client(
            f"token_url: https://idp.example.com/t\nclient_id: a\nclient_secret_file: {empty}\n"
        )
    ) == [
        f"routes.yaml:5:25: clients.orders.client_secret_file: '{empty}' is empty; "
        "put the secret in it"
    ]


def test_empty_client_secret_is_refused() -> None:
    assert problems(CLIENTS, environ={"ORDERS_SECRET": ""}) == [
        "routes.yaml:5:20: clients.orders.client_secret: is empty; set it (e.g. from ${ENV})"
    ]


@pytest.mark.parametrize(
    "secret_lines",
    ["client_secret: x\nclient_secret_file: /run/secrets/orders\n", ""],
    ids=["both", "neither"],
)
def test_exactly_one_of_client_secret_and_client_secret_file_is_required(
    secret_lines: str,
) -> None:
    text = with_client("token_url: https://idp.example.com/t\nclient_id: a\n" + secret_lines)
    assert problems(text) == [
        "routes.yaml:3:5: clients.orders: set exactly one of client_secret or client_secret_file"
    ]


# --- token URLs -----------------------------------------------------------------------


def token_url_problems(url: str) -> list[str]:
    return problems(with_client(f"token_url: '{url}'\nclient_id: a\nclient_secret: s\n"))


@pytest.mark.parametrize("url", ["ftp://idp.example.com/token", "idp.example.com/token", ""])
def test_token_url_that_is_not_http_is_refused(url: str) -> None:
    assert token_url_problems(url) == [
        f"routes.yaml:3:16: clients.orders.token_url: '{url}' is not an http(s) URL; "
        "write e.g. https://idp.example.com/oauth2/token"
    ]


@pytest.mark.parametrize(
    "url", ["https://user:pw@idp.example.com/token", "https://idp.example.com/token#x"]
)
def test_token_url_with_userinfo_or_fragment_is_refused(url: str) -> None:
    assert token_url_problems(url) == [
        "routes.yaml:3:16: clients.orders.token_url: must not carry user:password@ or a "
        "#fragment; remove them"
    ]


@pytest.mark.parametrize(
    "url",
    [
        "http://idp.example.com/token",
        "http://10.0.0.1/token",
        "http://localhost.example.com/token",
        "http://0.0.0.0:8080/token",
    ],
)
def test_plain_http_token_url_is_refused_off_loopback(url: str) -> None:
    assert token_url_problems(url) == [
        "routes.yaml:3:16: clients.orders.token_url: must be https (client secrets would "
        "travel in cleartext); plain http is only allowed on loopback"
    ]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8080/token",
        "http://[::1]:8080/token",
        "http://localhost:8080/token",
        "http://LOCALHOST/token",
    ],
)
def test_plain_http_token_url_is_allowed_on_loopback(url: str) -> None:
    text = with_client(f"token_url: '{url}'\nclient_id: a\nclient_secret: s\n")
    assert load(text).clients["orders"].token_url == url


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1/token",
        "https://idp.example.com:99999/token",
        "https://idp.example.com:port/token",
    ],
    ids=["unclosed-ipv6", "port-out-of-range", "port-not-a-number"],
)
def test_malformed_token_url_is_a_config_problem_on_its_field(url: str) -> None:
    found = token_url_problems(url)
    assert len(found) == 1
    assert found[0].startswith("routes.yaml:3:16: clients.orders.token_url: ")


def test_client_token_params_are_kept_sorted() -> None:
    text = with_client(
        "token_url: https://idp.example.com/t\nclient_id: a\nclient_secret: s\n"
        "token_params:\n  tenant: acme\n  audience_type: x\n"
    )
    assert load(text).clients["orders"].token_params == (("audience_type", "x"), ("tenant", "acme"))


@pytest.mark.parametrize("name", ["grant_type", "client_id", "client_secret", "scope"])
def test_reserved_client_token_params_are_refused(name: str) -> None:
    text = with_client(
        "token_url: https://idp.example.com/t\nclient_id: a\nclient_secret: s\n"
        f"token_params:\n  {name}: x\n"
    )
    assert problems(text) == [
        f"routes.yaml:7:7: clients.orders.token_params.{name}: is set by the proxy itself; "
        "use the route's or client's dedicated field instead"
    ]


def test_reserved_route_token_params_are_refused() -> None:
    text = with_route(
        "host: api.example.com\nclient: orders\ntoken_params:\n  resource: x\n  tenant: y\n"
    )
    assert problems(text) == [
        "routes.yaml:10:7: routes[0].token_params.resource: is set by the proxy itself; "
        "use the route's or client's dedicated field instead"
    ]


# --- route hosts ----------------------------------------------------------------------


def route_host(host: str) -> tuple[str, int | None]:
    (route,) = load(with_route(f"host: '{host}'\nclient: orders\n")).routes
    return route.host, route.port


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("API.Example.COM", ("api.example.com", None)),
        ("api.example.com.", ("api.example.com", None)),
        ("api.example.com:8443", ("api.example.com", 8443)),
        ("[::1]:8080", ("::1", 8080)),
        ("*.example.com", ("*.example.com", None)),
        ("*.Example.COM.:8443", ("*.example.com", 8443)),
    ],
)
def test_route_host_is_normalised(host: str, expected: tuple[str, int | None]) -> None:
    assert route_host(host) == expected


@pytest.mark.parametrize(
    ("host", "suffix", "example"),
    [("*.com", "com", "*.example.com"), ("*.co.uk", "co.uk", "*.example.co.uk")],
)
def test_wildcard_spanning_a_public_suffix_is_refused(host: str, suffix: str, example: str) -> None:
    assert problems(with_route(f"host: '{host}'\nclient: orders\n")) == [
        f"routes.yaml:7:11: routes[0].host: wildcard '{host}' spans the public suffix "
        f"'{suffix}' and would match other organisations' hosts; name a domain you "
        f"control, e.g. {example}"
    ]


@pytest.mark.parametrize("host", ["*.example.com", "*.api.example.co.uk"])
def test_wildcard_below_a_registrable_domain_is_accepted(host: str) -> None:
    assert route_host(host) == (host, None)


@pytest.mark.parametrize("host", ["api.*.example.com", "*example.com", "a b.example.com", ""])
def test_malformed_route_host_is_refused(host: str) -> None:
    found = problems(with_route(f"host: '{host}'\nclient: orders\n"))
    assert len(found) == 1
    assert found[0].startswith("routes.yaml:7:11: routes[0].host: ")


def test_wildcard_label_in_the_middle_is_refused_with_the_wildcard_rule() -> None:
    assert problems(with_route("host: '*.*.example.com'\nclient: orders\n")) == [
        "routes.yaml:7:11: routes[0].host: a wildcard may only be a leading '*.' label, "
        "e.g. *.example.com"
    ]


# --- path prefixes, duplicates --------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [("/v1", "/v1"), ("/v1/", "/v1"), ("/v1//", "/v1"), ("/", ""), ("", ""), ("/a/b", "/a/b")],
)
def test_path_prefix_is_normalised(prefix: str, expected: str) -> None:
    config = load(with_route(f"host: api.example.com\npath_prefix: '{prefix}'\nclient: orders\n"))
    assert config.routes[0].path_prefix == expected


@pytest.mark.parametrize("prefix", ["v1", "/v1?x=1", "/v1#top"])
def test_path_prefix_must_be_a_plain_absolute_path(prefix: str) -> None:
    text = with_route(f"host: api.example.com\npath_prefix: '{prefix}'\nclient: orders\n")
    assert problems(text) == [
        f"routes.yaml:8:18: routes[0].path_prefix: '{prefix}' must be a path starting with '/' "
        "and without '?' or '#', e.g. /v1"
    ]


@pytest.mark.parametrize("prefix", ["/v1/../admin", "/./v1", "/v1/.."])
def test_path_prefix_with_dot_segments_is_refused(prefix: str) -> None:
    text = with_route(f"host: api.example.com\npath_prefix: '{prefix}'\nclient: orders\n")
    assert problems(text) == [
        "routes.yaml:8:18: routes[0].path_prefix: must not contain '.' or '..' segments; "
        "write the plain path"
    ]


def test_default_route_name_is_host_port_and_prefix() -> None:
    text = (
        CLIENTS
        + "routes:\n"
        + "  - {host: api.example.com:8443, path_prefix: /v1/, client: orders}\n"
        + "  - {host: other.example.com, client: orders, name: other}\n"
    )
    assert [r.name for r in load(text).routes] == ["api.example.com:8443/v1", "other"]


def test_duplicate_route_is_refused_after_normalisation() -> None:
    text = (
        CLIENTS
        + "routes:\n"
        + "  - {host: api.example.com, path_prefix: /v1, client: orders}\n"
        + "  - {host: API.example.com., path_prefix: /v1/, client: orders}\n"
    )
    assert problems(text) == [
        "routes.yaml:8:12: routes[1].host: same host and path_prefix as routes[0]; "
        "merge the two or remove one"
    ]


def test_same_host_with_different_prefix_or_port_is_not_a_duplicate() -> None:
    text = (
        CLIENTS
        + "routes:\n"
        + "  - {host: api.example.com, client: orders}\n"
        + "  - {host: api.example.com, path_prefix: /v1, client: orders}\n"
        + "  - {host: 'api.example.com:8443', client: orders}\n"
    )
    assert len(load(text).routes) == 3


def test_duplicate_yaml_key_is_refused_at_the_second_key() -> None:
    text = with_client(
        "token_url: https://idp.example.com/t\nclient_id: a\nclient_id: b\nclient_secret: s\n"
    )
    assert problems(text) == [
        "routes.yaml:5:5: clients.orders.client_id: duplicate key; keep only one of them "
        "(YAML would drop one)"
    ]


# --- upstream -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://api.example.com", Origin("https", "api.example.com", 443)),
        ("https://API.example.com/", Origin("https", "api.example.com", 443)),
        ("http://internal:8080", Origin("http", "internal", 8080)),
        ("https://[::1]:8443", Origin("https", "::1", 8443)),
    ],
)
def test_upstream_origin_is_parsed_with_an_explicit_port(url: str, expected: Origin) -> None:
    config = load(with_route(f"host: api.example.com\nclient: orders\nupstream: '{url}'\n"))
    assert config.routes[0].upstream == expected


@pytest.mark.parametrize(
    "url",
    [
        "https://api.example.com/v1",
        "https://api.example.com?x=1",
        "https://user@api.example.com",
        "https://api.example.com#f",
    ],
)
def test_upstream_with_a_path_query_user_or_fragment_is_refused(url: str) -> None:
    text = with_route(f"host: api.example.com\nclient: orders\nupstream: '{url}'\n")
    assert problems(text) == [
        f"routes.yaml:9:15: routes[0].upstream: '{url}' must name only an origin (no path, "
        "query, user or fragment); write scheme://host[:port], e.g. https://api.example.com"
    ]


@pytest.mark.parametrize("url", ["ftp://api.example.com", "api.example.com", "https://"])
def test_upstream_that_is_not_http_is_refused(url: str) -> None:
    text = with_route(f"host: api.example.com\nclient: orders\nupstream: '{url}'\n")
    assert problems(text) == [
        f"routes.yaml:9:15: routes[0].upstream: '{url}' is not an http(s) URL; "
        "write scheme://host[:port], e.g. https://api.example.com"
    ]


@pytest.mark.parametrize("url", ["https://[::1", "https://api.example.com:99999"])
def test_malformed_upstream_is_a_config_problem_on_its_field(url: str) -> None:
    text = with_route(f"host: api.example.com\nclient: orders\nupstream: '{url}'\n")
    found = problems(text)
    assert len(found) == 1
    assert found[0].startswith("routes.yaml:9:15: routes[0].upstream: ")


# --- scope, audience, resource --------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        ("'write read'", ("read", "write")),
        ("'read  read write'", ("read", "write")),
        ("[write, read]", ("read", "write")),
        ("''", ()),
        ("[]", ()),
    ],
)
def test_scope_is_a_string_or_a_list_deduplicated_and_sorted(
    scope: str, expected: tuple[str, ...]
) -> None:
    config = load(with_route(f"host: api.example.com\nclient: orders\nscope: {scope}\n"))
    assert config.routes[0].credential.scope == expected


def test_routes_with_the_same_scopes_in_any_order_share_one_credential() -> None:
    text = (
        CLIENTS
        + "routes:\n"
        + "  - {host: a.example.com, client: orders, scope: 'b a'}\n"
        + "  - {host: b.example.com, client: orders, scope: [a, b]}\n"
    )
    first, second = load(text).routes
    assert first.credential == second.credential
    assert hash(first.credential) == hash(second.credential)


def test_scope_list_item_with_a_space_is_refused() -> None:
    text = with_route("host: api.example.com\nclient: orders\nscope: [read, 'write orders']\n")
    assert problems(text) == [
        "routes.yaml:9:19: routes[0].scope[1]: scope 'write orders' is not a valid scope "
        "token (RFC 6749 §3.3); remove spaces and quotes"
    ]


def test_scope_of_the_wrong_type_is_reported_under_the_scope_field() -> None:
    found = problems(with_route("host: api.example.com\nclient: orders\nscope: 5\n"))
    assert len(found) == 1
    assert found[0].startswith("routes.yaml:9:12: routes[0].scope: ")


def test_empty_audience_and_resource_mean_none() -> None:
    text = with_route("host: api.example.com\nclient: orders\naudience: ''\nresource: ''\n")
    credential = load(text).routes[0].credential
    assert (credential.audience, credential.resource) == (None, None)


# --- YAML-level problems --------------------------------------------------------------


def test_invalid_yaml_names_the_line_of_the_error() -> None:
    assert problems("proxy:\n  listen: 1\n   bad: 2\n") == [
        "routes.yaml:3:7: invalid YAML: mapping values are not allowed here; "
        "fix the syntax at this spot"
    ]


def test_a_file_that_is_not_a_mapping_is_refused() -> None:
    assert problems("- a\n- b\n") == [
        "routes.yaml:1:1: the file must be a mapping with 'proxy', 'clients' and 'routes' keys"
    ]


def test_routes_that_are_not_a_list_are_refused() -> None:
    assert problems(CLIENTS + "routes:\n  host: api.example.com\n") == [
        "routes.yaml:7:3: routes: must be a list of routes (each item starts with '- ')"
    ]


def test_clients_that_are_not_a_mapping_are_refused() -> None:
    assert problems("clients: [a]\n") == [
        "routes.yaml:1:10: clients: must be a mapping of names to settings"
    ]


@pytest.mark.parametrize(
    "value",
    ["!!python/object:os.system x", "!!int abc", "!!float nope"],
    ids=["python-tag", "bad-int", "bad-float"],
)
def test_unsupported_or_malformed_yaml_tag_is_a_config_problem_not_a_crash(value: str) -> None:
    found = problems(f"proxy:\n  listen: {value}\n")
    assert len(found) == 1
    assert found[0].startswith("routes.yaml:2:11: ")


def test_all_problems_in_a_file_are_reported_at_once_in_file_order() -> None:
    text = """\
    proxy:
      listne: 127.0.0.1:8080
    clients:
      orders:
        token_url: http://idp.example.com/token
        client_id: orders-id
        client_secret: ${ORDERS_SECRET}
    routes:
      - host: '*.com'
        client: orders
      - host: api.example.com
        client: ordrs
    """
    found = problems(text, environ={})
    assert [p.split(": ")[0] for p in found] == [
        "routes.yaml:2:3",
        "routes.yaml:5:16",
        "routes.yaml:7:20",
        "routes.yaml:9:11",
        "routes.yaml:12:13",
    ]
    assert [p.split(": ")[1] for p in found] == [
        "proxy.listne",
        "clients.orders.token_url",
        "clients.orders.client_secret",
        "routes[0].host",
        "routes[1].client",
    ]


def test_a_bad_field_does_not_hide_the_other_problems_of_its_client() -> None:
    # An unset ${ORDERS_ID} leaves client_id empty; the plain-http token_url of the
    # same client must still be reported in the same run, not after the first fix.
    text = CLIENTS.replace("client_id: orders-id", "client_id: ${ORDERS_ID}").replace(
        "https://idp.example.com", "http://idp.example.com"
    )
    assert [p.split(": ")[1] for p in problems(text)] == [
        "clients.orders.token_url",
        "clients.orders.client_id",
    ]


# --- load_config ----------------------------------------------------------------------


def test_load_config_reads_the_file_and_names_it_in_problems(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(CLIENTS, encoding="utf-8")
    config = load_config(path, environ=ENV)
    assert config.source == str(path)
    assert secret_of(config.clients["orders"]) == "s3cret-value"
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value).startswith(f"{path}:5:20: clients.orders.client_secret: ")


def test_load_config_uses_the_process_environment_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(CLIENTS, encoding="utf-8")
    monkeypatch.setenv("ORDERS_SECRET", "from-os-environ")
    assert secret_of(load_config(path).clients["orders"]) == "from-os-environ"


def test_load_config_of_a_missing_file_says_so(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value) == (
        f"{path}: cannot read the routes file: No such file or directory; check the path"
    )


def test_load_config_of_a_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_bytes(b"proxy:\n  name: \xff\xfe\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value).startswith(f"{path}: cannot read the routes file: ")


def test_two_routes_with_the_same_name_are_refused() -> None:
    text = with_route("host: a.example.com\nclient: orders\nname: same\n")
    text += "  - host: b.example.com\n    client: orders\n    name: same\n"
    [problem] = problems(text)
    assert problem.endswith(
        "routes[1].name: route name 'same' is already used by routes[0]; "
        "give each route its own name"
    )


def test_listen_given_as_a_port_string_binds_loopback() -> None:
    text = "proxy:\n  listen: '${PORT}'\n" + CLIENTS
    config = load(text, environ={**ENV, "PORT": "18080"})
    assert (config.proxy.listen.host, config.proxy.listen.port) == ("127.0.0.1", 18080)


def test_an_unknown_key_in_a_route_does_not_hide_its_unknown_client() -> None:
    found = problems(with_route("host: api.example.com\nclient: ordrs\nscopes: read\n"))
    assert [p.split(": ", 2)[1] for p in found] == ["routes[0].client", "routes[0].scopes"]
    assert "did you mean 'orders'?" in found[0]


def test_issuer_replaces_token_url() -> None:
    text = CLIENTS.replace(
        "token_url: https://idp.example.com/oauth2/token", "issuer: https://idp.example.com/tenant"
    )
    client = load(text).clients["orders"]
    assert (client.token_url, client.issuer) == (None, "https://idp.example.com/tenant")


@pytest.mark.parametrize(
    ("line", "where"),
    [
        ("", "4:5"),  # the client's mapping starts one line lower
        ("token_url: https://idp.example.com/t\n    issuer: https://idp.example.com", "3:5"),
    ],
    ids=["neither", "both"],
)
def test_a_client_needs_exactly_one_of_token_url_and_issuer(line: str, where: str) -> None:
    text = CLIENTS.replace("token_url: https://idp.example.com/oauth2/token\n", line + "\n")
    assert problems(text) == [
        f"routes.yaml:{where}: clients.orders: set exactly one of token_url or issuer "
        "(the token endpoint is then discovered)"
    ]


def test_an_http_issuer_is_refused_off_loopback() -> None:
    text = CLIENTS.replace(
        "token_url: https://idp.example.com/oauth2/token", "issuer: http://idp.example.com"
    )
    [problem] = problems(text)
    assert problem.startswith("routes.yaml:3:13: clients.orders.issuer: must be https")


def _key_file(tmp_path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "key.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def test_private_key_jwt_loads_the_key_and_its_alg(tmp_path: Path) -> None:
    text = CLIENTS.replace(
        "client_secret: ${ORDERS_SECRET}",
        f"auth_method: private_key_jwt\n    private_key_file: "
        f"{_key_file(tmp_path)}\n    key_id: k1",
    )
    client = load(text).clients["orders"]
    assert client.client_secret is None
    assert client.signing_key is not None
    assert (client.signing_key.alg, client.signing_key.key_id) == ("ES256", "k1")
    assert "PRIVATE KEY" not in repr(client)


def test_private_key_jwt_problems_are_named(tmp_path: Path) -> None:
    text = CLIENTS.replace(
        "client_secret: ${ORDERS_SECRET}",
        f"client_secret: x\n    auth_method: private_key_jwt\n"
        f"    private_key_file: {_key_file(tmp_path)}\n"
        "    signing_alg: RS256",
    )
    found = problems(text)
    assert any(
        "clients.orders.client_secret: private_key_jwt signs with private_key_file "
        "and sends no secret; remove it" in p
        for p in found
    )
    assert any(
        "clients.orders.private_key_file: RS256 cannot be used with an EC key; use ES256" in p
        for p in found
    )


def test_key_fields_without_private_key_jwt_are_refused() -> None:
    text = CLIENTS.replace(
        "client_secret: ${ORDERS_SECRET}", "client_secret: ${ORDERS_SECRET}\n    key_id: k1"
    )
    [problem] = problems(text)
    assert problem.endswith(
        "clients.orders.key_id: is only used with auth_method: "
        "private_key_jwt, not client_secret_basic; remove it"
    )


def test_a_list_of_secrets_is_a_rotation(tmp_path: Path) -> None:
    text = CLIENTS.replace(
        "client_secret: ${ORDERS_SECRET}", 'client_secret: ["${ORDERS_SECRET}", next-secret]'
    )
    client = load(text).clients["orders"]
    assert secret_of(client) == "s3cret-value"
    assert [s.value for s in client.fallback_secrets] == ["next-secret"]
    assert client.secrets == ("s3cret-value", "next-secret")  # both are redacted from logs


def test_an_empty_secret_list_is_refused() -> None:
    text = CLIENTS.replace("client_secret: ${ORDERS_SECRET}", "client_secret: []")
    [problem] = problems(text)
    assert problem.endswith(
        "clients.orders.client_secret: is an empty list; give one secret, or two during a rotation"
    )


def test_client_assertion_file_replaces_the_private_key(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("a.b.c\n")
    text = CLIENTS.replace(
        "client_secret: ${ORDERS_SECRET}",
        f"auth_method: private_key_jwt\n    client_assertion_file: {token}",
    )
    client = load(text).clients["orders"]
    assert (client.assertion_file, client.signing_key, client.client_secret) == (
        str(token),
        None,
        None,
    )


def test_client_assertion_file_must_be_readable(tmp_path: Path) -> None:
    text = CLIENTS.replace(
        "client_secret: ${ORDERS_SECRET}",
        f"auth_method: private_key_jwt\n    client_assertion_file: {tmp_path / 'missing'}",
    )
    [problem] = problems(text)
    assert "clients.orders.client_assertion_file: cannot read" in problem


def test_an_unquoted_env_reference_in_a_flow_list_gets_a_hint() -> None:
    text = CLIENTS.replace("client_secret: ${ORDERS_SECRET}", "client_secret: [${A}, ${B}]")
    [problem] = problems(text)
    assert problem.endswith(
        'inside [ ] quote each ${VAR} reference ("${VAR}"), or write a block list'
    )


# --- TLS client certificates (RFC 8705) -----------------------------------------------


def _tls_client(tmp_path: Path, method: str = "tls_client_auth") -> tuple[str, CertFiles]:
    ca = trustme.CA()
    files = issue(ca, tmp_path, "client", "svc.example")
    text = CLIENTS.replace(
        "client_secret: ${ORDERS_SECRET}",
        f"auth_method: {method}\n    client_cert_file: {files.cert}\n"
        f"    client_key_file: {files.key}",
    )
    return text, files


def test_tls_client_auth_loads_the_certificate(tmp_path: Path) -> None:
    text, files = _tls_client(tmp_path)
    client = load(text).clients["orders"]
    assert client.auth_method is AuthMethod.TLS_CLIENT_AUTH
    assert client.certificate is not None
    assert client.certificate.cert_file == str(files.cert)
    assert client.client_secret is None
    assert client.files == (str(files.cert), str(files.key))


def test_tls_client_auth_without_a_certificate_is_refused() -> None:
    text = CLIENTS.replace("client_secret: ${ORDERS_SECRET}", "auth_method: tls_client_auth")
    [problem] = problems(text)
    assert "clients.orders: tls_client_auth needs client_cert_file and client_key_file" in problem


def test_a_secret_with_tls_client_auth_is_refused(tmp_path: Path) -> None:
    text, _ = _tls_client(tmp_path, "self_signed_tls_client_auth")
    text = text.replace("auth_method:", "client_secret: x\n    auth_method:")
    [problem] = problems(text)
    assert problem.endswith(
        "clients.orders.client_secret: is not used with self_signed_tls_client_auth; remove it"
    )


def test_a_certificate_with_the_wrong_key_names_both_files(tmp_path: Path) -> None:
    text, files = _tls_client(tmp_path)
    other = issue(trustme.CA(), tmp_path, "other", "svc.example")
    text = text.replace(str(files.key), str(other.key))
    [problem] = problems(text)
    assert f"clients.orders.client_cert_file: cannot use '{files.cert}' with key '{other.key}'" in (
        problem
    )
    assert "PRIVATE" not in problem


def test_a_certificate_without_its_key_is_refused(tmp_path: Path) -> None:
    text, files = _tls_client(tmp_path, "client_secret_basic")
    text = text.replace(f"\n    client_key_file: {files.key}", "\n    client_secret: x")
    [problem] = problems(text)
    assert problem.endswith("set client_key_file too: the certificate and its key go together")


def test_a_ca_file_that_is_not_pem_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    text = CLIENTS + f"    ca_file: {bad}\n"
    [problem] = problems(text)
    assert f"clients.orders.ca_file: cannot use '{bad}' as a CA bundle" in problem


def test_route_client_certificate_needs_a_client_certificate() -> None:
    text = with_route("host: api.example.com\nclient: orders\nclient_certificate: true\n")
    [problem] = problems(text)
    assert problem.endswith(
        "routes[0].client_certificate: client 'orders' has no client_cert_file to present; "
        "add client_cert_file and client_key_file to it, or remove this"
    )


def test_route_ca_file_and_client_certificate_are_kept(tmp_path: Path) -> None:
    text, _ = _tls_client(tmp_path)
    ca_file = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca_file))
    text += (
        "routes:\n  - host: api.example.com\n    client: orders\n"
        f"    ca_file: {ca_file}\n    client_certificate: true\n"
    )
    [route] = load(text).routes
    assert (route.ca_file, route.client_certificate) == (str(ca_file), True)


# --- interception CA and https modes --------------------------------------------------


def _with_ca(tmp_path: Path, route_extra: str = "") -> str:
    files = init_ca(tmp_path / "ca")
    return (
        f"proxy:\n  ca_cert_file: {files.cert_file}\n  ca_key_file: {files.key_file}\n"
        + with_route(f"host: api.example.com\nclient: orders\n{route_extra}")
    )


def test_an_interception_ca_is_loaded_and_routes_intercept_by_default(tmp_path: Path) -> None:
    config = load(_with_ca(tmp_path))
    assert config.proxy.intercepts
    assert config.routes[0].https is HttpsMode.INTERCEPT


def test_a_ca_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    text = _with_ca(tmp_path)
    (tmp_path / "ca" / "ca-key.pem").chmod(0o644)
    [problem] = problems(text)
    assert "proxy.ca_key_file:" in problem
    assert "chmod 600" in problem


def test_a_ca_cert_without_its_key_is_refused(tmp_path: Path) -> None:
    files = init_ca(tmp_path / "ca")
    [problem] = problems(f"proxy:\n  ca_cert_file: {files.cert_file}\n")
    assert problem.endswith(
        "proxy: set ca_key_file too (the interception CA needs both); create them with "
        "`m2m-proxy ca init --dir DIR`"
    )


def test_https_intercept_without_a_ca_is_refused() -> None:
    [problem] = problems(with_route("host: api.example.com\nclient: orders\nhttps: intercept\n"))
    assert "routes[0].https: intercept needs an interception CA" in problem


def test_https_tunnel_needs_no_ca() -> None:
    config = load(with_route("host: api.example.com\nclient: orders\nhttps: tunnel\n"))
    assert config.routes[0].https is HttpsMode.TUNNEL


def test_connect_ports_must_be_tcp_ports() -> None:
    [problem] = problems("proxy:\n  connect_ports: [443, 70000]\n")
    assert problem.endswith("proxy.connect_ports[1]: 70000 is not a TCP port (1-65535)")
    assert load("proxy:\n  connect_ports: [443, 8443]\n").proxy.connect_ports == {443, 8443}


# --- upgrades ------------------------------------------------------------------------


def test_a_route_allows_no_upgrade_by_default() -> None:
    config = load(with_route("host: api.example.com\nclient: orders\n"))
    assert config.routes[0].upgrades == frozenset()


def test_upgrades_are_protocol_names_compared_in_lower_case() -> None:
    config = load(with_route("host: api.example.com\nclient: orders\nupgrades: [WebSocket]\n"))
    assert config.routes[0].upgrades == frozenset({"websocket"})


def test_h2c_is_never_an_allowed_upgrade() -> None:
    text = with_route("host: api.example.com\nclient: orders\nupgrades: [websocket, H2C]\n")
    assert problems(text) == [
        "routes.yaml:9:27: routes[0].upgrades[1]: 'H2C' is never allowed: HTTP/2 inside the "
        "switched connection would bypass the proxy's header rules and token; remove it"
    ]


def test_an_upgrade_that_is_not_a_token_is_refused() -> None:
    found = problems(
        with_route("host: api.example.com\nclient: orders\nupgrades: ['web socket']\n")
    )
    assert len(found) == 1
    assert found[0].startswith("routes.yaml:9:")
    assert "routes[0].upgrades[0]: 'web socket' is not a protocol name" in found[0]


def test_upgrades_need_the_lean_upstream_client() -> None:
    text = "proxy:\n  upstream_client: aiohttp\n" + with_route(
        "host: api.example.com\nclient: orders\nupgrades: [websocket]\n"
    )
    assert problems(text) == [
        "routes.yaml:11:15: routes[0].upgrades: needs proxy.upstream_client: lean (the aiohttp "
        "client cannot hand over the connection after 101); remove it or use lean"
    ]
