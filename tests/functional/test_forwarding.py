"""What the upstream receives and what the client gets back, on real sockets."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import socket
from typing import Any

import aiohttp
from aiohttp import web

from tests.functional.support import (
    SENTINEL_TOKEN,
    FakeServer,
    fake_server,
    running_proxy,
    token_answer,
)


async def _idp(_request: web.Request) -> web.Response:
    return token_answer()


def _routes(idp: FakeServer, api: FakeServer, proxy_extra: str = "") -> str:
    api_port = api.url.rsplit(":", 1)[1]
    return f"""
proxy:
  idle_timeout_s: 1.0
{proxy_extra}
clients:
  svc:
    token_url: {idp.url}/token
    client_id: svc
    client_secret: ${{SENTINEL_SECRET}}
routes:
  - host: api.test
    client: svc
    upstream: {api.url}
  - host: 127.0.0.1:{api_port}
    client: svc
"""


def _headers(record: dict[str, Any]) -> list[tuple[str, str]]:
    return [(k.lower(), v) for k, v in record["headers"]]


async def _raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    return out


async def _echo(request: web.Request) -> web.StreamResponse:
    path = request.path
    if path == "/redirect":
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")
    if path == "/gzip":
        return web.Response(
            body=gzip.compress(b"hello " * 100),
            headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"},
        )
    if path == "/hop":
        return web.Response(
            text="x",
            headers={
                "Connection": "X-Upstream-Hop",
                "X-Upstream-Hop": "1",
                "Keep-Alive": "5",
                "Proxy-Authenticate": "Basic",
                "X-End-To-End": "kept",
            },
        )
    if path == "/empty":
        return web.Response(status=204)
    if path == "/slow":
        await asyncio.sleep(3)
    if path == "/drip":
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(50):
            await resp.write(b"x" * 1024)
            await asyncio.sleep(0.05)
        return resp
    if path == "/break":
        resp = web.StreamResponse(headers={"Content-Length": "1000"})
        await resp.prepare(request)
        await resp.write(b"x" * 10)
        assert request.transport is not None
        request.transport.close()
        return resp
    body = await request.read()
    return web.json_response({"sha": hashlib.sha256(body).hexdigest(), "len": len(body)})


async def test_upstream_gets_one_token_no_hop_by_hop_and_the_target_host() -> None:
    async with fake_server(_idp) as idp, fake_server(_echo) as api:
        async with running_proxy(_routes(idp, api)) as proxy:
            async with aiohttp.ClientSession(
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding")
            ) as client:
                headers = {
                    "Authorization": "Bearer client-own-token",
                    "Connection": "keep-alive, X-Hop-Secret",
                    "X-Hop-Secret": "must-not-pass",
                    "Proxy-Authorization": "Basic c2VjcmV0OnNlY3JldA==",
                    "Proxy-Connection": "keep-alive",
                    "X-Custom": "passes",
                }
                async with client.get(
                    "http://api.test/h?q=1", proxy=proxy.url, headers=headers
                ) as resp:
                    assert resp.status == 200
    [received] = api.requests
    names = [k for k, _ in _headers(received)]
    assert received["path"] == "/h?q=1"
    assert [v for k, v in _headers(received) if k == "authorization"] == [
        f"Bearer {SENTINEL_TOKEN}"
    ]
    assert ("host", api.url.removeprefix("http://")) in _headers(received)
    assert ("x-custom", "passes") in _headers(received)
    assert ("via", "1.1 m2m-proxy") in _headers(received)
    for hop in ("x-hop-secret", "proxy-authorization", "proxy-connection", "connection"):
        assert hop not in names
    assert "user-agent" not in names  # the proxy adds no headers of its own
    assert "accept-encoding" not in names


async def test_absolute_form_target_wins_over_a_conflicting_host_header() -> None:
    async with fake_server(_idp) as idp, fake_server(_echo) as api:
        async with running_proxy(_routes(idp, api)) as proxy:
            authority = api.url.removeprefix("http://")
            raw = (
                f"GET http://{authority}/abs HTTP/1.1\r\nHost: evil.test\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            answer = await _raw(proxy.server.proxy_port, raw)
    assert answer.startswith(b"HTTP/1.1 200")
    [received] = api.requests
    assert ("host", authority) in _headers(received)


async def test_response_hop_by_hop_removed_and_bytes_passed_unchanged() -> None:
    async with fake_server(_idp) as idp, fake_server(_echo) as api:
        async with running_proxy(_routes(idp, api)) as proxy:
            async with aiohttp.ClientSession(auto_decompress=False) as client:
                async with client.get("http://api.test/hop", proxy=proxy.url) as resp:
                    assert "X-Upstream-Hop" not in resp.headers
                    assert "Keep-Alive" not in resp.headers
                    assert "Proxy-Authenticate" not in resp.headers
                    assert resp.headers["X-End-To-End"] == "kept"
                    assert resp.headers["Via"] == "1.1 m2m-proxy"
                async with client.get("http://api.test/gzip", proxy=proxy.url) as resp:
                    raw = await resp.read()
                    assert resp.headers["Content-Encoding"] == "gzip"
                    assert resp.headers["Content-Length"] == str(len(raw))
    assert gzip.decompress(raw) == b"hello " * 100


async def test_redirects_are_returned_not_followed() -> None:
    async with fake_server(_idp) as idp, fake_server(_echo) as api:
        async with running_proxy(_routes(idp, api)) as proxy:
            async with aiohttp.ClientSession() as client:
                async with client.get(
                    "http://api.test/redirect", proxy=proxy.url, allow_redirects=False
                ) as resp:
                    assert resp.status == 302
                    assert resp.headers["Location"].startswith("http://169.254.169.254/")
    assert [r["path"] for r in api.requests] == ["/redirect"]


async def test_head_and_204_keep_their_framing() -> None:
    async with fake_server(_idp) as idp, fake_server(_echo) as api:
        async with running_proxy(_routes(idp, api)) as proxy:
            async with aiohttp.ClientSession() as client:
                async with client.head("http://api.test/gzip", proxy=proxy.url) as resp:
                    assert resp.status == 200
                    assert await resp.read() == b""
                async with client.get("http://api.test/empty", proxy=proxy.url) as resp:
                    assert resp.status == 204
                    assert await resp.read() == b""
                async with client.get("http://api.test/after", proxy=proxy.url) as resp:
                    assert resp.status == 200  # the keep-alive connection is still sane


async def test_large_chunked_upload_streams_intact_beyond_the_replay_limit() -> None:
    chunks = [bytes([i]) * 65536 for i in range(40)]  # 2.5 MiB, over the 1 MiB limit

    async def body() -> Any:
        for chunk in chunks:
            yield chunk

    async with fake_server(_idp) as idp, fake_server(_echo) as api:
        async with running_proxy(_routes(idp, api)) as proxy:
            async with aiohttp.ClientSession() as client:
                async with client.post(
                    "http://api.test/upload", proxy=proxy.url, data=body()
                ) as resp:
                    result = await resp.json()
    assert result == {"sha": hashlib.sha256(b"".join(chunks)).hexdigest(), "len": 40 * 65536}


async def test_unmatched_passthrough_forwards_without_a_token() -> None:
    async with fake_server(_idp) as idp, fake_server(_echo) as api:
        # the fake API is on loopback, which the egress policy refuses unless allowed
        extra = "  unmatched: passthrough\n  allow_destinations: [127.0.0.1/32]"
        routes = _routes(idp, api, extra).replace(
            f"  - host: 127.0.0.1:{api.url.rsplit(':', 1)[1]}\n    client: svc\n", ""
        )
        async with running_proxy(routes) as proxy:
            async with aiohttp.ClientSession() as client:
                async with client.get(
                    f"{api.url}/open", proxy=proxy.url, headers={"Authorization": "Bearer own"}
                ) as resp:
                    assert resp.status == 200
    [received] = api.requests
    assert [v for k, v in _headers(received) if k == "authorization"] == ["Bearer own"]
    assert idp.requests == []


async def test_malformed_targets_get_400_and_reach_nobody() -> None:
    async with fake_server(_idp) as idp, fake_server(_echo) as api:
        async with running_proxy(_routes(idp, api)) as proxy:
            port = proxy.server.proxy_port
            userinfo = await _raw(
                port, b"GET http://user:pw@api.test/ HTTP/1.1\r\nHost: api.test\r\n\r\n"
            )
            dots = await _raw(
                port, b"GET http://api.test/a/%2e%2e/admin HTTP/1.1\r\nHost: api.test\r\n\r\n"
            )
            scheme = await _raw(port, b"GET ftp://api.test/ HTTP/1.1\r\nHost: api.test\r\n\r\n")
    for answer in (userinfo, dots, scheme):
        assert answer.startswith(b"HTTP/1.1 400"), answer[:80]
        assert b"application/problem+json" in answer
    assert api.requests == []
    assert idp.requests == []


async def test_https_target_is_never_sent_in_cleartext() -> None:
    async with fake_server(_idp) as idp, fake_server(_echo) as api:
        async with running_proxy(_routes(idp, api)) as proxy:
            authority = api.url.removeprefix("http://")
            answer = await _raw(
                proxy.server.proxy_port,
                f"GET https://{authority}/secret HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode(),
            )
    # The plain-HTTP server cannot speak TLS: the handshake fails, nothing is sent in clear.
    assert answer.startswith(b"HTTP/1.1 502"), answer[:80]
    assert api.requests == []


async def test_upstream_unreachable_and_timeout_and_truncation() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    async with fake_server(_idp) as idp, fake_server(_echo) as api:
        routes = (
            _routes(idp, api)
            + f"""
  - host: dead.test
    client: svc
    upstream: http://127.0.0.1:{dead_port}
"""
        )
        async with running_proxy(routes) as proxy:
            async with aiohttp.ClientSession() as client:
                async with client.get("http://dead.test/", proxy=proxy.url) as resp:
                    assert resp.status == 502
                    assert (await resp.json(content_type=None))["code"] == "upstream_unreachable"
                async with client.get("http://api.test/slow", proxy=proxy.url) as resp:
                    assert resp.status == 504
                    assert (await resp.json(content_type=None))["code"] == "upstream_timeout"
                truncated = False
                try:
                    async with client.get("http://api.test/break", proxy=proxy.url) as resp:
                        assert resp.status == 200
                        await resp.read()
                except aiohttp.ClientPayloadError:
                    truncated = True
                assert truncated, "a broken upstream body must reach the client as truncated"
                async with client.get("http://api.test/ok", proxy=proxy.url) as resp:
                    assert resp.status == 200


async def test_a_client_that_hangs_up_is_logged_as_499_client_closed() -> None:
    async with fake_server(_idp) as idp, fake_server(_echo) as api:
        async with running_proxy(_routes(idp, api)) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.proxy_port)
            writer.write(b"GET http://api.test/drip HTTP/1.1\r\nHost: api.test\r\n\r\n")
            await writer.drain()
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            writer.close()
            for _ in range(100):
                if proxy.log_events("request_completed"):
                    break
                await asyncio.sleep(0.02)
            [event] = proxy.log_events("request_completed")
    assert event["status"] == 499
    assert event["error"] == "client_closed"
    assert event["route"] == "api.test"


async def test_passthrough_to_loopback_is_refused_by_the_egress_policy() -> None:
    async with fake_server(_idp) as idp, fake_server(_echo) as api:
        routes = _routes(idp, api, "  unmatched: passthrough").replace(
            f"  - host: 127.0.0.1:{api.url.rsplit(':', 1)[1]}\n    client: svc\n", ""
        )
        port = api.url.rsplit(":", 1)[1]
        async with running_proxy(routes) as proxy, aiohttp.ClientSession() as client:
            for url in (
                f"{api.url}/open",  # literal
                f"http://localhost:{port}/open",  # a name resolving to loopback
                f"http://2130706433:{port}/open",  # decimal form of 127.0.0.1
                f"http://[::ffff:127.0.0.1]:{port}/open",  # IPv4-mapped IPv6
                "http://169.254.169.254/latest/meta-data/",  # cloud metadata
                "http://metadata.google.internal/computeMetadata/v1/",
            ):
                async with client.get(url, proxy=proxy.url) as resp:
                    body = await resp.json()
                    assert (resp.status, body["code"]) == (403, "destination_denied"), url
    assert api.requests == []
