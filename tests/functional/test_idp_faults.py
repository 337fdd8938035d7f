"""An IdP that is down, hangs, fails or sends garbage: documented errors, fast, and the
proxy keeps serving other routes."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web

from tests.functional.support import Handler, fake_server, free_port, running_proxy, token_answer


def _routes(token_url: str, upstream: str, extra: str = "") -> str:
    return f"""
proxy:
  token_timeout_s: 1.0
  token_retries: 2
{extra}
clients:
  broken:
    token_url: {token_url}
    client_id: svc
    client_secret: ${{SENTINEL_SECRET}}
  healthy:
    token_url: {token_url.rsplit("/", 1)[0]}/healthy
    client_id: svc
    client_secret: ${{SENTINEL_SECRET}}
routes:
  - host: broken.test
    client: broken
    upstream: {upstream}
  - host: healthy.test
    client: healthy
    upstream: {upstream}
"""


async def _ok(_request: web.Request) -> web.Response:
    return web.Response(text="upstream ok")


async def _get(
    client: aiohttp.ClientSession, proxy: str, url: str
) -> tuple[int, dict[str, str], dict[str, object]]:
    async with client.get(url, proxy=proxy) as resp:
        body = await resp.json(content_type=None) if resp.status >= 400 else {}
        return resp.status, dict(resp.headers), body


async def _check_keeps_serving(client: aiohttp.ClientSession, proxy_url: str) -> None:
    async with client.get("http://healthy.test/", proxy=proxy_url) as resp:
        assert resp.status == 200
        assert await resp.text() == "upstream ok"


def _idp_handler(mode: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/healthy"):
            return token_answer()
        if mode == "500":
            return web.Response(status=500, text="boom")
        if mode == "hang":
            await asyncio.sleep(30)
        if mode == "garbage":
            return web.Response(status=200, text="<html>not json</html>")
        if mode == "crlf":
            return web.json_response(
                {"access_token": "abc\r\nX-Injected: 1", "token_type": "Bearer"}
            )
        if mode == "429":
            return web.Response(status=429, headers={"Retry-After": "60"})
        raise AssertionError(mode)

    return handler


async def test_idp_5xx_is_retried_then_502_token_unavailable() -> None:
    async with fake_server(_idp_handler("500")) as idp, fake_server(_ok) as api:
        async with running_proxy(_routes(f"{idp.url}/token", api.url)) as proxy:
            async with aiohttp.ClientSession() as client:
                started = time.monotonic()
                status, headers, body = await _get(client, proxy.url, "http://broken.test/")
                elapsed = time.monotonic() - started
                await _check_keeps_serving(client, proxy.url)
    assert status == 502
    assert body["code"] == "token_unavailable"
    assert "Retry-After" in headers
    assert elapsed < 2.0
    assert len([r for r in idp.requests if r["path"] == "/token"]) == 3  # 1 + 2 retries
    assert api.requests and all(r["path"] == "/" for r in api.requests)
    assert len(api.requests) == 1  # only the healthy route reached the upstream


async def test_idp_that_hangs_gives_504_within_the_token_timeout() -> None:
    async with fake_server(_idp_handler("hang")) as idp, fake_server(_ok) as api:
        async with running_proxy(_routes(f"{idp.url}/token", api.url)) as proxy:
            async with aiohttp.ClientSession() as client:
                started = time.monotonic()
                status, _, body = await _get(client, proxy.url, "http://broken.test/")
                elapsed = time.monotonic() - started
                await _check_keeps_serving(client, proxy.url)
    assert status == 504
    assert body["code"] == "token_timeout"
    assert 0.9 < elapsed < 2.0


async def test_idp_garbage_gives_502_token_response_invalid() -> None:
    async with fake_server(_idp_handler("garbage")) as idp, fake_server(_ok) as api:
        async with running_proxy(_routes(f"{idp.url}/token", api.url)) as proxy:
            async with aiohttp.ClientSession() as client:
                status, _, body = await _get(client, proxy.url, "http://broken.test/")
                await _check_keeps_serving(client, proxy.url)
    assert status == 502
    assert body["code"] == "token_response_invalid"


async def test_token_with_crlf_is_refused_not_injected() -> None:
    async with fake_server(_idp_handler("crlf")) as idp, fake_server(_ok) as api:
        async with running_proxy(_routes(f"{idp.url}/token", api.url)) as proxy:
            async with aiohttp.ClientSession() as client:
                status, _, body = await _get(client, proxy.url, "http://broken.test/")
    assert status == 502
    assert body["code"] == "token_response_invalid"
    assert len(api.requests) == 0


async def test_idp_429_retry_after_beyond_budget_fails_fast_with_retry_after() -> None:
    async with fake_server(_idp_handler("429")) as idp, fake_server(_ok) as api:
        async with running_proxy(_routes(f"{idp.url}/token", api.url)) as proxy:
            async with aiohttp.ClientSession() as client:
                started = time.monotonic()
                status, headers, body = await _get(client, proxy.url, "http://broken.test/")
                elapsed = time.monotonic() - started
    assert status == 502
    assert body["code"] == "token_unavailable"
    assert headers["Retry-After"] == "60"
    assert elapsed < 0.5
    assert len([r for r in idp.requests if r["path"] == "/token"]) == 1


async def test_idp_down_gives_502_fast_and_failure_is_held_briefly() -> None:
    dead = f"http://127.0.0.1:{free_port()}/token"
    async with fake_server(_ok) as api:
        routes = _routes(dead, api.url).replace(
            f"{dead.rsplit('/', 1)[0]}/healthy", f"{api.url}/never-called"
        )
        async with running_proxy(routes) as proxy:
            async with aiohttp.ClientSession() as client:
                started = time.monotonic()
                results = await asyncio.gather(
                    *(_get(client, proxy.url, "http://broken.test/") for _ in range(20))
                )
                elapsed = time.monotonic() - started
            failures = proxy.log_events("token_fetch_failed")
    assert {status for status, _, _ in results} == {502}
    assert {body["code"] for _, _, body in results} == {"token_unavailable"}
    assert elapsed < 3.0
    assert len(failures) == 1  # 20 concurrent requests shared one failing fetch


async def test_an_absurd_expires_in_is_clamped_with_a_warning() -> None:
    async def idp(_request: web.Request) -> web.Response:
        return web.json_response(
            {"access_token": "t", "token_type": "Bearer", "expires_in": 10**12}
        )

    async with fake_server(idp) as server, fake_server(_ok) as api:
        async with running_proxy(_routes(f"{server.url}/token", api.url)) as proxy:
            async with aiohttp.ClientSession() as client:
                async with client.get("http://broken.test/", proxy=proxy.url) as resp:
                    assert resp.status == 200
            [warning] = proxy.log_events("token_lifetime_clamped")
            [fetched] = proxy.log_events("token_fetched")
    assert warning["expires_in_s"] == 10**12
    assert warning["used_s"] == fetched["lifetime_s"] == 86400
