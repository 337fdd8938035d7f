"""Where the metadata of an issuer is looked for."""

from __future__ import annotations

import pytest

from m2m_proxy.tokens.discovery import metadata_urls


@pytest.mark.parametrize(
    ("issuer", "oidc", "rfc8414"),
    [
        (
            "https://idp.example.com",
            "https://idp.example.com/.well-known/openid-configuration",
            "https://idp.example.com/.well-known/oauth-authorization-server",
        ),
        (
            "https://idp.example.com/realms/main/",
            "https://idp.example.com/realms/main/.well-known/openid-configuration",
            "https://idp.example.com/.well-known/oauth-authorization-server/realms/main",
        ),
    ],
)
def test_oidc_then_rfc8414_well_known_urls(issuer: str, oidc: str, rfc8414: str) -> None:
    assert metadata_urls(issuer) == (oidc, rfc8414)
