"""Where the metadata of an issuer is looked for."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from m2m_proxy.errors import TokenResponseInvalidError
from m2m_proxy.tokens.discovery import Discovery, metadata_urls


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


# --- mTLS endpoint aliases (RFC 8705 §5) ---------------------------------------------


@pytest.fixture
async def metadata_server() -> AsyncIterator[tuple[str, dict[str, object]]]:
    """An issuer on 127.0.0.1 serving ``document`` (filled in by the test)."""
    document: dict[str, object] = {}

    async def serve(_request: web.Request) -> web.Response:
        return web.json_response(document)

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}", document
    await runner.cleanup()


async def test_a_certificate_client_uses_the_mtls_alias(
    metadata_server: tuple[str, dict[str, object]],
) -> None:
    issuer, document = metadata_server
    document.update(
        issuer=issuer,
        token_endpoint=f"{issuer}/token",
        mtls_endpoint_aliases={"token_endpoint": "https://mtls.idp.example/token"},
    )
    async with aiohttp.ClientSession() as session:
        discovery = Discovery(session)
        assert await discovery.token_endpoint(issuer) == f"{issuer}/token"
        assert await discovery.token_endpoint(issuer, mtls=True) == "https://mtls.idp.example/token"


async def test_without_an_alias_a_certificate_client_uses_the_token_endpoint(
    metadata_server: tuple[str, dict[str, object]],
) -> None:
    issuer, document = metadata_server
    document.update(issuer=issuer, token_endpoint=f"{issuer}/token", mtls_endpoint_aliases={})
    async with aiohttp.ClientSession() as session:
        assert await Discovery(session).token_endpoint(issuer, mtls=True) == f"{issuer}/token"


async def test_a_cleartext_mtls_alias_off_loopback_is_refused(
    metadata_server: tuple[str, dict[str, object]],
) -> None:
    issuer, document = metadata_server
    document.update(
        issuer=issuer,
        token_endpoint=f"{issuer}/token",
        mtls_endpoint_aliases={"token_endpoint": "http://mtls.idp.example/token"},
    )
    async with aiohttp.ClientSession() as session:
        with pytest.raises(
            TokenResponseInvalidError, match=r"mtls_endpoint_aliases\.token_endpoint"
        ):
            await Discovery(session).token_endpoint(issuer, mtls=True)
