"""Access control (allow_from, allow_users) and the egress policy, without sockets."""

from __future__ import annotations

import base64
import ipaddress

import pytest

from m2m_proxy.access import Access
from m2m_proxy.config import AccessPolicy, ConfigError, parse_config
from m2m_proxy.egress import EgressPolicy, embedded_ipv4, literal_address
from m2m_proxy.errors import (
    AccessDeniedError,
    DestinationDeniedError,
    LoopDetectedError,
    ProxyAuthRequiredError,
    render_problem,
)
from m2m_proxy.headers import received_by

USERS = """
proxy:
  users:
    alice: ${ALICE_PW}
    bob: ${BOB_PW}
  allow_from: [10.0.0.0/8, "::1"]
clients:
  c:
    token_url: https://idp.example.com/token
    client_id: x
    client_secret: y
routes:
  - host: open.example.com
    client: c
    allow_from: [0.0.0.0/0, "::/0"]
  - host: alice.example.com
    client: c
    allow_users: [alice]
"""
ENV = {"ALICE_PW": "alice-pw", "BOB_PW": "bob-pw"}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def access() -> tuple[Access, dict[str, AccessPolicy | None]]:
    config = parse_config(USERS, "r.yaml", ENV)
    policies = {route.host: route.access for route in config.routes}
    return Access(config.proxy.access, config.proxy.users), policies


def test_allow_from_admits_listed_sources_only(
    access: tuple[Access, dict[str, AccessPolicy | None]],
) -> None:
    checker, _ = access
    assert checker.check(None, "10.1.2.3", None) is None
    assert checker.check(None, "::ffff:10.1.2.3", None) is None  # IPv4-mapped peer
    assert checker.check(None, "::1", None) is None
    for peer in ("192.168.1.1", "11.0.0.1", None, "not-an-ip"):
        with pytest.raises(AccessDeniedError):
            checker.check(None, peer, None)


def test_a_routes_allow_from_replaces_the_default(
    access: tuple[Access, dict[str, AccessPolicy | None]],
) -> None:
    checker, policies = access
    assert checker.check(policies["open.example.com"], "203.0.113.9", None) is None


def test_allow_users_needs_valid_basic_credentials(
    access: tuple[Access, dict[str, AccessPolicy | None]],
) -> None:
    checker, policies = access
    policy = policies["alice.example.com"]
    assert checker.check(policy, "10.0.0.1", basic("alice", "alice-pw")) == "alice"
    for header in (None, basic("alice", "wrong"), basic("nobody", "x"), "Bearer x", "Basic ###"):
        with pytest.raises(ProxyAuthRequiredError):
            checker.check(policy, "10.0.0.1", header)
    with pytest.raises(AccessDeniedError, match="user 'bob' may not use"):
        checker.check(policy, "10.0.0.1", basic("bob", "bob-pw"))
    assert checker.check(policy, "10.0.0.1", None, user="alice") == "alice"  # at CONNECT


def test_407_carries_proxy_authenticate() -> None:
    status, headers, _ = render_problem(ProxyAuthRequiredError("log in"), "egress-a")
    assert status == 407
    assert headers["Proxy-Authenticate"] == 'Basic realm="egress-a", charset="UTF-8"'


def test_unknown_users_and_bad_cidrs_are_config_errors() -> None:
    text = USERS.replace("allow_users: [alice]", "allow_users: [alise]").replace(
        '"::1"]', '"::1", 10.0.0.300]'
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, "r.yaml", ENV)
    messages = [str(p) for p in info.value.problems]
    assert any("proxy.allow_from[2]: '10.0.0.300' is not an address or CIDR" in m for m in messages)
    assert any(
        "routes[1].allow_users[0]: unknown user 'alise'; did you mean 'alice'?" in m
        for m in messages
    )


def test_an_open_non_loopback_listener_is_flagged() -> None:
    base = (
        "clients:\n  c: {token_url: 'https://idp.example.com/t', client_id: x, client_secret: y}\n"
        "routes:\n  - {host: api.example.com, client: c}\n"
    )
    assert parse_config(base, "r.yaml", {}).open_listener is None
    wide = parse_config("proxy:\n  listen: 0.0.0.0:8080\n" + base, "r.yaml", {})
    assert wide.open_listener is not None
    assert "set proxy.allow_from" in wide.open_listener
    guarded = parse_config(
        "proxy:\n  listen: 0.0.0.0:8080\n  allow_from: [10.0.0.0/8]\n" + base, "r.yaml", {}
    )
    assert guarded.open_listener is None


# --- egress ---------------------------------------------------------------------------


@pytest.fixture
def egress() -> EgressPolicy:
    config = parse_config(
        "proxy:\n  allow_destinations: [10.1.0.0/16, intranet.example.com]\n", "r.yaml", {}
    )
    return EgressPolicy(config.proxy, own=[("0.0.0.0", 8080)])


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "::1",
        "169.254.169.254",
        "fd00:ec2::254",
        "10.2.0.1",
        "192.168.0.1",
        "172.16.5.5",
        "100.64.0.1",
        "0.0.0.0",
        "::ffff:127.0.0.1",
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "2130706433",  # decimal 127.0.0.1
        "0x7f.1",
        "127.1",
        "224.0.0.1",
        "metadata.google.internal",
    ],
)
def test_forbidden_literal_destinations(egress: EgressPolicy, host: str) -> None:
    with pytest.raises(DestinationDeniedError):
        egress.check_literal(host, 80)


@pytest.mark.parametrize("host", ["10.1.2.3", "93.184.216.34", "2606:4700::1", "example.com"])
def test_allowed_destinations(egress: EgressPolicy, host: str) -> None:
    egress.check_literal(host, 80)


def test_the_proxys_own_listener_is_a_loop(egress: EgressPolicy) -> None:
    with pytest.raises(LoopDetectedError):
        egress.check_literal("127.0.0.1", 8080)


async def test_names_resolving_to_loopback_are_refused(egress: EgressPolicy) -> None:
    with pytest.raises(DestinationDeniedError, match="loopback"):
        await egress.resolve("localhost", 443)
    assert await egress.resolve("intranet.example.com", 443) == "intranet.example.com"


def test_embedded_and_literal_forms() -> None:
    assert embedded_ipv4(ipaddress.ip_address("::ffff:10.0.0.1")) == ipaddress.ip_address(
        "10.0.0.1"
    )
    assert literal_address("0x7f000001") == ipaddress.ip_address("127.0.0.1")
    assert literal_address("api.example.com") is None
    assert literal_address("deadbeef") is None


def test_via_received_by_names() -> None:
    assert received_by("1.1 a, HTTP/1.0 b (comment), 1.1 c:8080") == {"a", "b", "c:8080"}
