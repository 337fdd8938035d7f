"""With short-lived tokens from the real IdP, steady load never waits on the IdP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import aiohttp
import pytest
from dev_stack import DevStack

from tests.functional.conftest import make_dev_stack, routes_for
from tests.functional.support import running_proxy

TTL_S = 5
LOAD_S = 30.0


@pytest.fixture(scope="module")
def short_token_stack() -> Iterator[DevStack]:
    with make_dev_stack(token_ttl_s=TTL_S) as stack:
        yield stack


async def test_steady_load_with_short_tokens_never_waits_for_a_token(
    short_token_stack: DevStack,
) -> None:
    stack = short_token_stack
    stack.reset()
    # skew 0.5 s: the default (60 s, at most half a lifetime) would renew 5 s tokens at
    # 50 %; with it they renew at 5 - (0.5 + 1) = 3.5 s, the 1 s being the granularity of
    # the IdP's exp: the upstream may reject a token up to 1 s before sent_at + 5 s
    routes = routes_for(stack, extra_proxy="  token_skew_s: 0.5")
    async with running_proxy(routes) as proxy, aiohttp.ClientSession() as client:
        statuses: list[int] = []
        deadline = time.monotonic() + LOAD_S

        async def worker() -> None:
            while time.monotonic() < deadline:
                async with client.get("http://api.demo.local/tick", proxy=proxy.url) as resp:
                    await resp.read()
                    statuses.append(resp.status)
                await asyncio.sleep(0.02)

        await asyncio.gather(*(worker() for _ in range(4)))
        events = proxy.log_events("request_completed")
    assert set(statuses) == {200}
    # no request ever carried a token the upstream took for expired (no 401 replays)
    assert {e["retried"] for e in events} == {"no"}
    outcomes = [e["token_cache"] for e in events]
    # only the first burst (one request per worker) waited for the one cold fetch
    assert "miss" not in outcomes[4:], outcomes
    assert outcomes.count("refresh_ahead") >= 2  # the later fetches ran in the background
    fetched = len(stack.token_requests())
    # one fetch, then one about every 3.5 s (plus the wait for the next request and the
    # fetch itself): 30 s of load → 8 to 10 fetches, fewer than one per 3 s
    assert 8 <= fetched <= 10, fetched
