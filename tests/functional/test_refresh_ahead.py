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

TTL_S = 3
LOAD_S = 7.5


@pytest.fixture(scope="module")
def short_token_stack() -> Iterator[DevStack]:
    with make_dev_stack(token_ttl_s=TTL_S) as stack:
        yield stack


async def test_steady_load_with_short_tokens_never_waits_for_a_token(
    short_token_stack: DevStack,
) -> None:
    stack = short_token_stack
    stack.reset()
    async with running_proxy(routes_for(stack)) as proxy, aiohttp.ClientSession() as client:
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
    assert set(statuses) == {200}  # no request ever carried an expired token
    outcomes = [e["token_cache"] for e in events]
    # only the first burst (one request per worker) waited for the one cold fetch
    assert "miss" not in outcomes[4:], outcomes
    assert outcomes.count("refresh_ahead") >= 2  # the later fetches ran in the background
    fetched = len(stack.token_requests())
    # one fetch, then one about every 0.8 x 3 s (±10 %): 7.5 s of load → 3 to 5 fetches
    assert 3 <= fetched <= 5, fetched
