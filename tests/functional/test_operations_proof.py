"""Operations, proven: exact metric values after a scripted sequence, /tokens without the
token, a reload under continuous load, SIGTERM-style shutdown during a streamed body."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from dev_stack import DevStack
from prometheus_client.parser import text_string_to_metric_families

from tests.functional.conftest import RESOURCE, routes_for
from tests.functional.support import (
    SENTINEL_SECRET,
    SENTINEL_TOKEN,
    fake_server,
    running_proxy,
    token_answer,
)


def scrape(text: str) -> dict[str, float]:
    """'name{a="x",b="y"}' → value, labels sorted."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


async def metrics_of(client: aiohttp.ClientSession, admin_url: str) -> dict[str, float]:
    async with client.get(f"{admin_url}/metrics") as resp:
        return scrape(await resp.text())


async def status_of(client: aiohttp.ClientSession, proxy: str, url: str) -> int:
    async with client.get(url, proxy=proxy) as resp:
        await resp.read()
        return resp.status


async def test_metric_values_after_a_scripted_sequence(stack: DevStack) -> None:
    """2 hits after a miss, a 401 replay that recovers, then an IdP outage."""
    idp_up = True

    async def idp(request: web.Request) -> web.StreamResponse:
        if not idp_up:
            return web.json_response({"error": "temporarily_unavailable"}, status=503)
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                stack.token_url,
                data=await request.post(),
                headers={"Authorization": request.headers["Authorization"]},
            ) as real,
        ):
            return web.Response(
                body=await real.read(), status=real.status, content_type="application/json"
            )

    async with fake_server(idp) as fake_idp:
        routes = routes_for(stack, extra_proxy="  token_retries: 0").replace(
            stack.token_url, f"{fake_idp.url}/token"
        )
        async with running_proxy(routes) as proxy, aiohttp.ClientSession() as client:
            url = "http://api.demo.local/m"
            for _ in range(3):
                assert await status_of(client, proxy.url, url) == 200  # miss, hit, hit
            stack.revoke_current()
            assert await status_of(client, proxy.url, url) == 200  # 401 → refresh → replay
            idp_up = False
            proxy.server.runtime.tokens.flush()  # type: ignore[union-attr]
            assert await status_of(client, proxy.url, url) == 502  # no token: IdP is down
            found = await metrics_of(client, proxy.admin_url)
    route = 'route="api.demo.local"'
    assert found[f'm2m_proxy_requests_total{{method="GET",{route},status_class="2xx"}}'] == 4
    assert found[f'm2m_proxy_requests_total{{method="GET",{route},status_class="5xx"}}'] == 1
    assert found['m2m_proxy_token_cache_lookups_total{outcome="miss"}'] == 2
    assert found['m2m_proxy_token_cache_lookups_total{outcome="hit"}'] == 3
    assert found['m2m_proxy_replays_total{outcome="recovered"}'] == 1
    assert found['m2m_proxy_token_requests_total{client="basic",outcome="success"}'] == 2
    assert found['m2m_proxy_token_requests_total{client="basic",outcome="unavailable"}'] == 1
    assert found['m2m_proxy_token_fetch_duration_seconds_count{client="basic"}'] == 3
    assert found[f"m2m_proxy_request_duration_seconds_count{{{route}}}"] == 5


async def _sentinel_idp(_request: web.Request) -> web.Response:
    return token_answer(SENTINEL_TOKEN)


async def _ok(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


def _one_route(idp_url: str, upstream_url: str) -> str:
    """One client at a fake IdP (sentinel secret) and one route to ``upstream_url``."""
    return f"""
clients:
  c:
    token_url: {idp_url}/token
    client_id: x
    client_secret: ${{SENTINEL_SECRET}}
routes:
  - host: api.example.test
    client: c
    upstream: {upstream_url}
"""


async def test_tokens_never_shows_the_token() -> None:
    async with fake_server(_sentinel_idp) as fake_idp, fake_server(_ok) as upstream:
        routes = _one_route(fake_idp.url, upstream.url)
        async with running_proxy(routes) as proxy, aiohttp.ClientSession() as client:
            assert await status_of(client, proxy.url, "http://api.example.test/") == 200
            for path in ("/tokens", "/metrics"):
                async with client.get(f"{proxy.admin_url}{path}") as resp:
                    body = await resp.text()
                assert SENTINEL_TOKEN not in body
                assert SENTINEL_SECRET not in body
            async with client.get(f"{proxy.admin_url}/tokens") as resp:
                [state] = (await resp.json())["credentials"]
    assert state["held"] is True
    assert upstream.requests[0]["headers"].count(("Authorization", f"Bearer {SENTINEL_TOKEN}")) == 1


async def test_a_reload_under_continuous_load_loses_no_request(
    stack: DevStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SENTINEL_SECRET", SENTINEL_SECRET)
    base = routes_for(stack)
    extra = f"""
  - host: extra.demo.local
    client: post
    scope: [read]
    audience: {RESOURCE}
    upstream: {stack.api_url}
"""
    with_extra, without_extra = tmp_path / "a.yaml", tmp_path / "b.yaml"
    with_extra.write_text(base + extra)
    without_extra.write_text(base)
    async with running_proxy(base) as proxy, aiohttp.ClientSession() as client:
        statuses: list[int] = []
        extra_statuses: list[int] = []
        deadline = time.monotonic() + 3.0

        async def load() -> None:
            while time.monotonic() < deadline:
                statuses.append(await status_of(client, proxy.url, "http://api.demo.local/l"))

        async def reloads() -> None:
            for i in range(10):
                await asyncio.sleep(0.25)
                assert proxy.server.reload(str(with_extra if i % 2 == 0 else without_extra))
                extra_statuses.append(
                    await status_of(client, proxy.url, "http://extra.demo.local/e")
                )

        await asyncio.gather(load(), load(), load(), reloads())
    assert len(statuses) > 50
    assert set(statuses) == {200}  # not one request lost or failed across 10 reloads
    assert extra_statuses == [200, 403] * 5  # and routing followed each reload


async def test_shutdown_during_a_streamed_response_lets_it_finish(stack: DevStack) -> None:
    chunks, chunk = 20, b"x" * 65536

    async def streaming(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(chunks):
            await response.write(chunk)
            await asyncio.sleep(0.05)  # about 1 s in all
        await response.write_eof()
        return response

    async with fake_server(streaming) as upstream:
        routes = routes_for(stack, extra_proxy="  shutdown_grace_s: 5").replace(
            f"upstream: {stack.api_url}", f"upstream: {upstream.url}", 1
        )
        async with running_proxy(routes) as proxy:
            async with (
                aiohttp.ClientSession() as client,
                client.get("http://api.demo.local/stream", proxy=proxy.url) as resp,
            ):
                first = await resp.content.readexactly(len(chunk))
                started = time.monotonic()
                _, rest = await asyncio.gather(proxy.server.stop(), resp.read())
                elapsed = time.monotonic() - started
    assert len(first) + len(rest) == chunks * len(chunk)
    assert elapsed < 5  # within the grace period
