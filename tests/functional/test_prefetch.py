"""prefetch: true — tokens fetched at start, /readyz waits for them."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from dev_stack import DevStack

from tests.functional.conftest import routes_for
from tests.functional.support import fake_server, running_proxy, token_answer


async def _readyz(url: str) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as client, client.get(f"{url}/readyz") as resp:
        return resp.status, await resp.json()


async def test_prefetched_token_is_held_before_the_first_request(stack: DevStack) -> None:
    routes = routes_for(stack).replace(
        "    client_id: svc-basic\n", "    client_id: svc-basic\n    prefetch: true\n"
    )
    async with running_proxy(routes) as proxy:
        for _ in range(100):
            status, _ = await _readyz(proxy.admin_url)
            if status == 200:
                break
            await asyncio.sleep(0.05)
        assert status == 200
        assert len(stack.token_requests()) == 1  # fetched with no request through the proxy
        async with aiohttp.ClientSession() as client:
            async with client.get("http://api.demo.local/x", proxy=proxy.url) as resp:
                assert resp.status == 200
        [event] = proxy.log_events("request_completed")
    assert event["token_cache"] == "hit"


async def test_readiness_names_the_missing_token_until_the_idp_answers() -> None:
    healthy = asyncio.Event()

    async def idp(_request: web.Request) -> web.Response:
        if not healthy.is_set():
            return web.Response(status=503)
        return token_answer()

    async with fake_server(idp) as server:
        routes = f"""
proxy:
  token_retries: 0
  token_failure_hold_s: 0.2
clients:
  warm:
    token_url: {server.url}/token
    client_id: warm
    client_secret: ${{SENTINEL_SECRET}}
    prefetch: true
routes:
  - {{host: api.test, client: warm, scope: read}}
"""
        async with running_proxy(routes) as proxy:
            await asyncio.sleep(0.3)
            status, body = await _readyz(proxy.admin_url)
            assert status == 503
            assert body["missing"] == ["token:warm scope=read"]
            healthy.set()
            for _ in range(100):
                status, body = await _readyz(proxy.admin_url)
                if status == 200:
                    break
                await asyncio.sleep(0.05)
    assert status == 200, body
    assert len(server.requests) >= 2  # retried in the background after the hold
