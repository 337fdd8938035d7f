"""An IdP that fails in each way, while a valid token is cached and after it expires.

One proxy, one client per failure mode. Each client gets a 3 s token; the IdP then
starts failing. Until the token expires requests keep succeeding (the refresh runs in
the background); after, they fail fast with the documented status and a Retry-After,
and the IdP sees a bounded number of calls, not one per request.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web

from tests.functional.support import fake_server, running_proxy, token_answer

MODES = {  # mode → (status after expiry, error code)
    "disconnect": (502, "token_unavailable"),
    "hang": (504, "token_timeout"),
    "http500": (502, "token_unavailable"),
    "http429": (502, "token_unavailable"),
    "garbage": (502, "token_response_invalid"),
    "invalid_client": (502, "token_rejected"),
}
LIFETIME_S = 3


async def test_each_idp_failure_is_invisible_until_expiry_then_fast_and_bounded() -> None:
    failing = asyncio.Event()
    calls: dict[str, int] = dict.fromkeys(MODES, 0)

    async def idp(request: web.Request) -> web.StreamResponse:
        mode = request.path.strip("/")
        calls[mode] += 1
        if not failing.is_set():
            return token_answer(token=f"token-{mode}", expires_in=LIFETIME_S)
        if mode == "disconnect":
            assert request.transport is not None
            request.transport.abort()  # the IdP drops the connection
            return web.Response()
        if mode == "hang":
            await asyncio.sleep(30)
        if mode == "http500":
            return web.Response(status=500)
        if mode == "http429":
            return web.Response(status=429, headers={"Retry-After": "2"})
        if mode == "garbage":
            return web.Response(text="<html>")
        return web.json_response({"error": "invalid_client"}, status=401)

    async def api(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async with fake_server(idp) as idp_server, fake_server(api) as upstream:
        clients = "".join(
            f"""
  {mode}:
    token_url: {idp_server.url}/{mode}
    client_id: {mode}
    client_secret: ${{SENTINEL_SECRET}}"""
            for mode in MODES
        )
        routes = "".join(
            f'\n  - {{host: {mode}.test, client: {mode}, upstream: "{upstream.url}"}}'
            for mode in MODES
        )
        config = f"""
proxy:
  token_timeout_s: 0.5
  token_retries: 1
  token_skew_s: 1
clients:{clients}
routes:{routes}
"""
        async with running_proxy(config) as proxy, aiohttp.ClientSession() as client:

            async def get(mode: str) -> tuple[int, dict[str, object], str | None]:
                async with client.get(f"http://{mode}.test/", proxy=proxy.url) as resp:
                    body = await resp.json(content_type=None) if resp.status != 200 else {}
                    return resp.status, body, resp.headers.get("Retry-After")

            started = time.monotonic()
            assert [s for s, _, _ in await asyncio.gather(*(get(m) for m in MODES))] == [200] * len(
                MODES
            )
            failing.set()
            await asyncio.sleep(max(0.0, 2.2 - (time.monotonic() - started)))  # past refresh_at
            during = await asyncio.gather(*(get(m) for _ in range(5) for m in MODES))
            assert {status for status, _, _ in during} == {200}  # still the valid tokens
            await asyncio.sleep(max(0.0, LIFETIME_S + 0.3 - (time.monotonic() - started)))
            calls_at_expiry = dict(calls)
            t0 = time.monotonic()
            after = {m: [await get(m) for _ in range(3)] for m in MODES}
            elapsed = time.monotonic() - t0
    for mode, results in after.items():
        status, code = MODES[mode]
        assert {s for s, _, _ in results} == {status}, (mode, results)
        assert {b["code"] for _, b, _ in results} == {code}, mode
        assert all(retry_after for _, _, retry_after in results), mode
    assert elapsed < 3.0  # failing fast: at most one budget (0.5 s) spent waiting
    for mode in MODES:
        # after expiry, 3 requests cost at most one more fetch (with its one retry)
        assert calls[mode] - calls_at_expiry[mode] <= 2, (mode, calls)
