"""The frozen runtime config values: secrets stay hidden, authorities render right."""

from __future__ import annotations

import dataclasses

import pytest

from m2m_proxy.config import (
    Address,
    AuthMethod,
    ClientConfig,
    CredentialSpec,
    Origin,
    RouteConfig,
    Secret,
)

SENTINEL = "sentinel-secret-4c1f"


def make_client() -> ClientConfig:
    return ClientConfig(
        name="orders",
        token_url="https://idp.example.com/token",
        client_id="orders-id",
        client_secret=Secret(SENTINEL),
        auth_method=AuthMethod.CLIENT_SECRET_BASIC,
    )


def test_secret_repr_and_str_never_show_the_value() -> None:
    secret = Secret(SENTINEL)
    assert repr(secret) == "Secret('***')"
    assert str(secret) == "Secret('***')"
    assert f"{secret} {secret!r}" == "Secret('***') Secret('***')"
    assert secret.value == SENTINEL


def test_client_config_repr_never_shows_the_secret() -> None:
    client = make_client()
    assert SENTINEL not in repr(client)
    assert SENTINEL not in str(client)
    assert "client_secret=Secret('***')" in repr(client)


def test_secrets_compare_by_value() -> None:
    assert Secret("a") == Secret("a")
    assert Secret("a") != Secret("b")


def test_config_values_are_frozen() -> None:
    client = make_client()
    with pytest.raises(dataclasses.FrozenInstanceError):
        client.client_id = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("address", "shown"),
    [(Address("127.0.0.1", 8080), "127.0.0.1:8080"), (Address("::1", 9901), "[::1]:9901")],
)
def test_address_renders_as_host_port_with_ipv6_bracketed(address: Address, shown: str) -> None:
    assert str(address) == shown


@pytest.mark.parametrize(
    ("origin", "authority"),
    [
        (Origin("https", "api.example.com", 443), "api.example.com"),
        (Origin("http", "api.example.com", 80), "api.example.com"),
        (Origin("https", "api.example.com", 8443), "api.example.com:8443"),
        (Origin("http", "api.example.com", 443), "api.example.com:443"),
        (Origin("https", "::1", 443), "[::1]"),
        (Origin("http", "::1", 8080), "[::1]:8080"),
    ],
)
def test_origin_authority_omits_only_the_scheme_default_port(
    origin: Origin, authority: str
) -> None:
    assert origin.authority == authority


@pytest.mark.parametrize(
    ("host", "wildcard"), [("*.example.com", True), ("api.example.com", False)]
)
def test_route_is_wildcard_when_its_host_starts_with_star_dot(host: str, wildcard: bool) -> None:
    route = RouteConfig(
        name="r", host=host, port=None, path_prefix="", credential=CredentialSpec(client="c")
    )
    assert route.is_wildcard is wildcard
