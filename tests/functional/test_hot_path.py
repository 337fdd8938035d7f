"""The cache-hit path on real sockets: a request with a cached token never awaits the
token cache, never reaches the token endpoint, and asks the cache exactly one
synchronous question (``peek``)."""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from m2m_proxy.tokens.cache import TokenCache
from tests.functional.support import fake_server, running_proxy, token_answer

REQUESTS = 25


async def _idp(_request: web.Request) -> web.Response:
    return token_answer(expires_in=3600)


async def _ok(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


def _counting(calls: Counter[str], name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(method):

        async def awaited(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return await method(*args, **kwargs)

        return awaited

    def called(*args: Any, **kwargs: Any) -> Any:
        calls[name] += 1
        return method(*args, **kwargs)

    return called


def test_the_cache_hit_lookup_is_not_a_coroutine() -> None:
    assert not inspect.iscoroutinefunction(TokenCache.peek)
    assert not inspect.iscoroutinefunction(TokenCache.current)


@pytest.mark.parametrize("mode", ["forward", "host"])
async def test_a_cache_hit_does_not_await_the_token_cache(mode: str) -> None:
    async with fake_server(_idp) as idp, fake_server(_ok) as api:
        routes = f"""
clients:
  c:
    token_url: {idp.url}/token
    client_id: x
    client_secret: ${{SENTINEL_SECRET}}
routes:
  - host: api.example.test
    client: c
    upstream: {api.url}
"""
        async with running_proxy(routes) as proxy, aiohttp.ClientSession() as client:
            if mode == "forward":
                url, headers, via = "http://api.example.test/x", {}, proxy.url
            else:
                url, headers, via = proxy.url + "/x", {"Host": "api.example.test"}, None
            async with client.get(url, headers=headers, proxy=via) as resp:  # the miss
                assert resp.status == 200
            cache = proxy.server.runtime.tokens
            calls: Counter[str] = Counter()
            for name in ("peek", "current", "obtain", "invalidate"):
                setattr(cache, name, _counting(calls, name, getattr(cache, name)))
            for _ in range(REQUESTS):
                async with client.get(url, headers=headers, proxy=via) as resp:
                    assert resp.status == 200
                    assert await resp.text() == "ok"
    assert calls == Counter(peek=REQUESTS), calls
    assert len(idp.requests) == 1
    assert len(api.requests) == REQUESTS + 1
    tokens = [e["token_cache"] for e in proxy.log_events("request_completed")]
    assert tokens == ["miss"] + ["hit"] * REQUESTS
