"""The proxy against the real dev IdP (oidc-provider) and the JWT-validating demo API."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from typing import Any
from urllib.parse import unquote_plus

import aiohttp
import httpx
import requests
from aiohttp import web
from dev_stack import DevStack

from tests.functional.conftest import RESOURCE, routes_for
from tests.functional.support import SENTINEL_SECRET, fake_server, run_cli, running_proxy


def _basic_client_id(record: dict[str, Any]) -> str | None:
    value = record.get("basic_client_id")
    return str(value) if value is not None else None


async def test_curl_with_http_proxy_env_gets_a_token_for_the_route(stack: DevStack) -> None:
    async with running_proxy(routes_for(stack)) as proxy:
        code, out, err = await run_cli(
            "curl",
            "-sS",
            "--fail-with-body",
            "http://api.demo.local/hello?x=1",
            env={"http_proxy": proxy.url, "no_proxy": ""},
        )
    assert code == 0, err
    body = json.loads(out)
    assert body["client_id"] == "svc-basic"
    assert body["aud"] == RESOURCE
    assert set(body["scope"].split()) == {"read", "write"}
    assert body["path"] == "/hello?x=1"
    assert body["authorization_count"] == 1
    assert body["headers"]["via"] == "1.1 m2m-proxy"


async def test_idp_received_basic_auth_scope_and_resource(stack: DevStack) -> None:
    async with running_proxy(routes_for(stack)) as proxy:
        code, _, err = await run_cli(
            "curl", "-sS", "--fail-with-body", "-x", proxy.url, "http://api.demo.local/a"
        )
    assert code == 0, err
    [record] = stack.token_requests()
    assert record["auth_header_scheme"] == "basic"
    assert _basic_client_id(record) == "svc-basic"
    form = record["form"]
    assert form["grant_type"] == "client_credentials"
    assert set(form["scope"].split()) == {"read", "write"}
    assert form["resource"] == RESOURCE
    assert "client_secret" not in form


async def test_idp_received_post_auth_and_audience(stack: DevStack) -> None:
    async with running_proxy(routes_for(stack)) as proxy:
        code, out, err = await run_cli(
            "curl", "-sS", "--fail-with-body", "-x", proxy.url, "http://post.demo.local/b"
        )
    assert code == 0, err
    assert json.loads(out)["client_id"] == "svc-post"
    [record] = stack.token_requests()
    assert record["auth_header_scheme"] is None
    form = record["form"]
    assert form["client_id"] == "svc-post"
    assert form["client_secret"] == SENTINEL_SECRET
    assert form["scope"] == "read"
    assert form["audience"] == RESOURCE


async def test_python_requests_and_httpx_use_the_proxy_from_env(stack: DevStack) -> None:
    async with running_proxy(routes_for(stack)) as proxy:
        env = {"HTTP_PROXY": proxy.url, "http_proxy": proxy.url, "NO_PROXY": "", "no_proxy": ""}

        def with_requests() -> dict[str, Any]:
            session = requests.Session()
            proxies = requests.utils.get_environ_proxies("http://api.demo.local/")
            assert proxies == {"http": proxy.url}
            resp = session.post(
                "http://api.demo.local/r", data=b"payload", proxies=proxies, timeout=10
            )
            resp.raise_for_status()
            result: dict[str, Any] = resp.json()
            return result

        def with_httpx() -> dict[str, Any]:
            with httpx.Client(trust_env=True, timeout=10) as client:
                resp = client.get("http://post.demo.local/h")
                resp.raise_for_status()
                result: dict[str, Any] = resp.json()
                return result

        import os  # noqa: PLC0415 - env is patched only for the duration of the calls

        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            via_requests = await asyncio.to_thread(with_requests)
            via_httpx = await asyncio.to_thread(with_httpx)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    assert via_requests["client_id"] == "svc-basic"
    assert via_requests["body_sha256"] == hashlib.sha256(b"payload").hexdigest()
    assert via_httpx["client_id"] == "svc-post"


async def test_host_header_mode_routes_like_forward_mode(stack: DevStack) -> None:
    async with running_proxy(routes_for(stack)) as proxy:
        code, out, err = await run_cli(
            "curl",
            "-sS",
            "--fail-with-body",
            f"{proxy.url}/by-host",
            "-H",
            "Host: api.demo.local",
        )
    assert code == 0, err
    assert json.loads(out)["path"] == "/by-host"


async def test_200_concurrent_cold_requests_cause_one_token_request(stack: DevStack) -> None:
    async with running_proxy(routes_for(stack)) as proxy, aiohttp.ClientSession() as client:

        async def one(i: int) -> int:
            async with client.get(f"http://api.demo.local/c{i}", proxy=proxy.url) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one(i) for i in range(200)))
    assert statuses == [200] * 200
    assert len(stack.token_requests()) == 1


async def test_revoked_token_is_recovered_by_one_refresh_and_replay(stack: DevStack) -> None:
    payload = b'{"order": 42, "note": "must arrive exactly once"}'
    async with running_proxy(routes_for(stack)) as proxy, aiohttp.ClientSession() as client:
        async with client.get("http://api.demo.local/warm", proxy=proxy.url) as resp:
            assert resp.status == 200
        stack.revoke_current()
        async with client.post(
            "http://api.demo.local/orders",
            data=payload,
            proxy=proxy.url,
            headers={"Content-Type": "application/json"},
        ) as resp:
            body = await resp.json()
            assert resp.status == 200
        [completed] = [e for e in proxy.log_events("request_completed") if e["method"] == "POST"]
    assert body["body_sha256"] == hashlib.sha256(payload).hexdigest()
    assert body["body_len"] == len(payload)
    assert len(stack.token_requests()) == 2  # the first token, then one refresh
    stats = stack.api_stats()
    assert stats["rejected_401"] == 1
    assert completed["retried"] == "recovered"


async def test_50_concurrent_401s_cause_one_refresh(stack: DevStack) -> None:
    """The upstream holds 50 requests with the first token, then rejects them all at once."""
    first_token: list[str] = []
    held = asyncio.Event()
    waiting = 0

    async def upstream(request: web.Request) -> web.Response:
        nonlocal waiting
        auth = request.headers["Authorization"]
        if not first_token:
            first_token.append(auth)
        if auth == first_token[0]:
            waiting += 1
            if waiting == 50:
                held.set()
            await held.wait()
            return web.Response(status=401, headers={"WWW-Authenticate": "Bearer"})
        return web.Response(text="ok")

    async with fake_server(upstream) as api:
        routes = routes_for(stack).replace(stack.api_url, api.url)
        async with running_proxy(routes) as proxy, aiohttp.ClientSession() as client:

            async def one(i: int) -> int:
                async with client.get(f"http://api.demo.local/r{i}", proxy=proxy.url) as resp:
                    await resp.read()
                    return resp.status

            statuses = await asyncio.gather(*(one(i) for i in range(50)))
    assert statuses == [200] * 50
    assert len(stack.token_requests()) == 2  # the first token, then exactly one refresh
    assert len(api.requests) == 100  # 50 rejected, 50 replayed


async def test_401_on_non_replayable_body_goes_back_and_drops_the_token(stack: DevStack) -> None:
    routes = routes_for(stack, extra_proxy="  replay_body_limit_bytes: 4")
    async with running_proxy(routes) as proxy, aiohttp.ClientSession() as client:
        async with client.get("http://api.demo.local/warm", proxy=proxy.url) as resp:
            assert resp.status == 200
        stack.revoke_current()
        async with client.post(
            "http://api.demo.local/big", data=b"x" * 100, proxy=proxy.url
        ) as resp:
            assert resp.status == 401
            assert "invalid_token" in resp.headers["WWW-Authenticate"]
        async with client.get("http://api.demo.local/after", proxy=proxy.url) as resp:
            assert resp.status == 200
        events = proxy.log_events("request_completed")
    assert [e["retried"] for e in events] == ["no", "not_replayable", "no"]
    assert len(stack.token_requests()) == 2


async def test_insufficient_scope_403_passes_through_without_refresh(stack: DevStack) -> None:
    routes = routes_for(stack).replace("scope: [read]", "scope: [write]")
    async with running_proxy(routes) as proxy, aiohttp.ClientSession() as client:
        async with client.get("http://post.demo.local/x", proxy=proxy.url) as resp:
            assert resp.status == 403
            assert 'error="insufficient_scope"' in resp.headers["WWW-Authenticate"]
    assert len(stack.token_requests()) == 1


async def test_unmatched_host_gets_403_problem_and_no_token_request(stack: DevStack) -> None:
    async with running_proxy(routes_for(stack)) as proxy, aiohttp.ClientSession() as client:
        async with client.get(f"{stack.api_url}/direct", proxy=proxy.url) as resp:
            body = await resp.json(content_type=None)
            assert resp.status == 403
            assert resp.headers["Content-Type"] == "application/problem+json"
            assert resp.headers["Proxy-Status"].startswith("m2m-proxy; error=")
    assert body["code"] == "route_denied"
    assert stack.token_requests() == []
    stats = stack.api_stats()
    assert stats["accepted"] == stats["rejected_401"] == stats["rejected_403"] == 0


def _basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_idp_rejection_is_502_token_rejected_and_logged_once(stack: DevStack) -> None:
    routes = routes_for(stack).replace(
        "client_secret: ${SENTINEL_SECRET}\n  post", "client_secret: wrong-secret\n  post", 1
    )
    async with running_proxy(routes) as proxy, aiohttp.ClientSession() as client:
        for _ in range(3):
            async with client.get("http://api.demo.local/x", proxy=proxy.url) as resp:
                body = await resp.json(content_type=None)
                assert resp.status == 502
                assert body["code"] == "token_rejected"
        failures = proxy.log_events("token_fetch_failed")
        async with client.get(f"{proxy.admin_url}/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["missing"] == ["client:basic accepted by the IdP"]
    assert failures[0]["oauth_error"] == "invalid_client"
    assert failures[0]["config_error"] is True
    assert len(failures) == 1  # the failure hold answers the next two without the IdP
    assert unquote_plus(_basic_client_id(stack.token_requests()[0]) or "") == "svc-basic"
