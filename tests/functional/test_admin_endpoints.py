"""The admin listener's /metrics, /tokens and /tokens/flush against the real dev stack."""

from __future__ import annotations

import aiohttp
from dev_stack import DevStack
from prometheus_client.parser import text_string_to_metric_families

from tests.functional.conftest import routes_for
from tests.functional.support import SENTINEL_SECRET, running_proxy


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_metrics_count_requests_tokens_and_lookups(stack: DevStack) -> None:
    async with running_proxy(routes_for(stack)) as proxy, aiohttp.ClientSession() as client:
        for path in ("/a", "/b", "/c"):
            async with client.get(f"http://api.demo.local{path}", proxy=proxy.url) as resp:
                assert resp.status == 200
        async with client.get("http://unrouted.example/x", proxy=proxy.url) as resp:
            assert resp.status == 403
        async with client.get(f"{proxy.admin_url}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=")
            text = await resp.text()
    found = samples(text)
    route = (("method", "GET"), ("route", "api.demo.local"), ("status_class", "2xx"))
    assert found[("m2m_proxy_requests_total", route)] == 3
    denied = (("method", "GET"), ("route", "-"), ("status_class", "4xx"))
    assert found[("m2m_proxy_requests_total", denied)] == 1
    assert found[("m2m_proxy_token_cache_lookups_total", (("outcome", "miss"),))] == 1
    assert found[("m2m_proxy_token_cache_lookups_total", (("outcome", "hit"),))] == 2
    assert (
        found[("m2m_proxy_token_requests_total", (("client", "basic"), ("outcome", "success")))]
        == 1
    )
    count = ("m2m_proxy_request_duration_seconds_count", (("route", "api.demo.local"),))
    assert found[count] == 3
    added = ("m2m_proxy_added_latency_seconds_count", (("route", "api.demo.local"),))
    assert found[added] == 3
    expiry = found[("m2m_proxy_token_expiry_seconds", (("client", "basic"),))]
    assert 250 < expiry <= 300
    assert found[("m2m_proxy_open_connections", ())] >= 1
    # bounded labels only: no host, path or token in the exposition
    for leak in ("unrouted.example", "/a", "Bearer", SENTINEL_SECRET, "127.0.0.1"):
        assert leak not in text


async def test_tokens_shows_the_cache_and_flush_drops_it(stack: DevStack) -> None:
    async with running_proxy(routes_for(stack)) as proxy, aiohttp.ClientSession() as client:
        async with client.get("http://api.demo.local/a", proxy=proxy.url) as resp:
            assert resp.status == 200
        async with client.get(f"{proxy.admin_url}/tokens") as resp:
            body = await resp.text()
            [state] = (await resp.json())["credentials"]
        assert state["client"] == "basic"
        assert state["scope"] == ["read", "write"]
        assert state["held"] is True
        assert state["fetches"] == 1
        assert state["last_error"] is None
        assert 250 < state["expires_in_s"] <= 300
        assert "eyJ" not in body and SENTINEL_SECRET not in body
        async with client.post(f"{proxy.admin_url}/tokens/flush?client=nope") as resp:
            assert resp.status == 404
        async with client.post(f"{proxy.admin_url}/tokens/flush?client=basic") as resp:
            assert (await resp.json())["dropped"] == 1
        async with client.get("http://api.demo.local/b", proxy=proxy.url) as resp:
            assert resp.status == 200
        outcomes = [e["token_cache"] for e in proxy.log_events("request_completed")]
    assert outcomes == ["miss", "miss"]
    assert len(stack.token_requests()) == 2
