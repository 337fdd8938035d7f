"""issuer: instead of token_url — the token endpoint comes from the IdP's metadata."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from dev_stack import DevStack

from tests.functional.conftest import RESOURCE
from tests.functional.support import fake_server, running_proxy, token_answer


def _routes(issuer: str, upstream: str) -> str:
    return f"""
clients:
  discovered:
    issuer: {issuer}
    client_id: svc-basic
    client_secret: ${{SENTINEL_SECRET}}
routes:
  - host: api.demo.local
    client: discovered
    scope: read
    resource: {RESOURCE}
    upstream: {upstream}
"""


async def test_issuer_discovery_against_the_real_idp(stack: DevStack) -> None:
    async with running_proxy(_routes(stack.issuer, stack.api_url)) as proxy:
        async with aiohttp.ClientSession() as client:
            async with client.get("http://api.demo.local/d", proxy=proxy.url) as resp:
                assert resp.status == 200
                assert (await resp.json())["client_id"] == "svc-basic"
    [record] = stack.token_requests()
    assert record["form"]["scope"] == "read"


async def _ok(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def test_rfc8414_metadata_is_used_when_oidc_discovery_is_absent_and_cached() -> None:
    issuer = ""

    async def idp(request: web.Request) -> web.Response:
        if request.path == "/.well-known/oauth-authorization-server/tenant":
            return web.json_response({"issuer": issuer, "token_endpoint": f"{issuer}/tok"})
        if request.path == "/tenant/tok":
            return token_answer(expires_in=1)  # short: the second request refetches
        return web.Response(status=404)

    async with fake_server(idp) as server, fake_server(_ok) as api:
        issuer = f"{server.url}/tenant"
        async with running_proxy(_routes(issuer, api.url)) as proxy:
            async with aiohttp.ClientSession() as client:
                for pause in (1.05, 0):  # the 1 s token expires between the two requests
                    async with client.get("http://api.demo.local/", proxy=proxy.url) as resp:
                        assert resp.status == 200
                    await asyncio.sleep(pause)
    paths = [r["path"] for r in server.requests]
    assert paths == [
        "/tenant/.well-known/openid-configuration",
        "/.well-known/oauth-authorization-server/tenant",
        "/tenant/tok",
        "/tenant/tok",  # the metadata was cached
    ]


async def test_metadata_naming_another_issuer_is_refused() -> None:
    async def idp(request: web.Request) -> web.Response:
        if request.path.endswith("/openid-configuration"):
            return web.json_response(
                {"issuer": "https://evil.example", "token_endpoint": "https://evil.example/t"}
            )
        return web.Response(status=404)

    async with fake_server(idp) as server, fake_server(_ok) as api:
        async with running_proxy(_routes(server.url, api.url)) as proxy:
            async with aiohttp.ClientSession() as client:
                async with client.get("http://api.demo.local/", proxy=proxy.url) as resp:
                    body = await resp.json(content_type=None)
    assert resp.status == 502
    assert body["code"] == "token_response_invalid"
    assert "names another issuer" in body["detail"]
    assert api.requests == []
    assert [r["path"] for r in server.requests] == ["/.well-known/openid-configuration"]
