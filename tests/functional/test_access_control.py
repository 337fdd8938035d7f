"""Who may use a route, on real sockets: 407 before any body is read, 403 for other
sources, credentials never forwarded; loops (508) and TRACE (405) refused."""

from __future__ import annotations

import asyncio
import base64
import socket

import aiohttp
from aiohttp import web

from tests.functional.support import (
    SENTINEL_TOKEN,
    fake_server,
    running_proxy,
    token_answer,
)

PASSWORD = "pw-7d2b1c"


async def _idp(_request: web.Request) -> web.Response:
    return token_answer()


async def _echo(request: web.Request) -> web.Response:
    return web.json_response({"headers": list(request.headers.items())})


def _routes(idp: str, api: str, proxy_extra: str = "", route_extra: str = "") -> str:
    return f"""
proxy:
  users:
    alice: ${{ALICE_PW}}
{proxy_extra}
clients:
  c:
    token_url: {idp}/token
    client_id: x
    client_secret: ${{SENTINEL_SECRET}}
routes:
  - host: api.example.test
    client: c
    upstream: {api}
    allow_users: [alice]
{route_extra}
"""


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        return sock.recv(65536)


async def test_407_comes_before_the_body_and_credentials_are_never_forwarded() -> None:
    async with fake_server(_idp) as idp, fake_server(_echo) as api:
        async with running_proxy(_routes(idp.url, api.url), {"ALICE_PW": PASSWORD}) as proxy:
            head = (
                b"POST http://api.example.test/upload HTTP/1.1\r\nHost: api.example.test\r\n"
                b"Content-Length: 1000000\r\nExpect: 100-continue\r\n\r\n"
            )
            answer = await asyncio.to_thread(_exchange, proxy.server.proxy_port, head)
            assert answer.startswith(
                b"HTTP/1.1 407 "
            )  # no 100 Continue: the body was not asked for
            assert b'Proxy-Authenticate: Basic realm="m2m-proxy"' in answer
            async with aiohttp.ClientSession() as client:
                async with client.get(
                    "http://api.example.test/x",
                    proxy=proxy.url,
                    headers={"Proxy-Authorization": _basic("alice", "wrong")},
                ) as resp:
                    assert resp.status == 407
                async with client.get(
                    "http://api.example.test/x",
                    proxy=proxy.url,
                    headers={"Proxy-Authorization": _basic("alice", PASSWORD)},
                ) as resp:
                    assert resp.status == 200
                    headers = dict((await resp.json())["headers"])
            logs = proxy.logs.getvalue()
    assert headers["Authorization"] == f"Bearer {SENTINEL_TOKEN}"
    assert "Proxy-Authorization" not in headers
    assert len(api.requests) == 1  # the refused requests never reached the API
    assert PASSWORD not in logs
    assert _basic("alice", PASSWORD).split()[1] not in logs


async def test_allow_from_refuses_other_sources() -> None:
    async with fake_server(_idp) as idp, fake_server(_echo) as api:
        routes = _routes(idp.url, api.url).replace(
            "    allow_users: [alice]\n", "    allow_from: [10.0.0.0/8]\n"
        )
        async with running_proxy(routes, {"ALICE_PW": PASSWORD}) as proxy:
            async with (
                aiohttp.ClientSession() as client,
                client.get("http://api.example.test/x", proxy=proxy.url) as resp,
            ):
                assert resp.status == 403
                assert (await resp.json())["code"] == "access_denied"
    assert api.requests == []
    assert idp.requests == []


async def test_connect_needs_credentials_too() -> None:
    async with fake_server(_idp) as idp, fake_server(_echo) as api:
        routes = _routes(idp.url, api.url, route_extra="    https: tunnel")
        async with running_proxy(routes, {"ALICE_PW": PASSWORD}) as proxy:
            port = proxy.server.proxy_port
            denied = await asyncio.to_thread(
                _exchange, port, b"CONNECT api.example.test:443 HTTP/1.1\r\n\r\n"
            )
            wrong = await asyncio.to_thread(
                _exchange,
                port,
                b"CONNECT api.example.test:443 HTTP/1.1\r\nProxy-Authorization: "
                + _basic("alice", "nope").encode()
                + b"\r\n\r\n",
            )
    assert denied.startswith(b"HTTP/1.1 407 ")
    assert b"Proxy-Authenticate: Basic" in denied
    assert wrong.startswith(b"HTTP/1.1 407 ")


async def test_a_request_carrying_our_own_via_is_a_loop() -> None:
    async with fake_server(_idp) as idp, fake_server(_echo) as api:
        routes = _routes(idp.url, api.url).replace("    allow_users: [alice]\n", "")
        async with (
            running_proxy(routes, {"ALICE_PW": PASSWORD}) as proxy,
            aiohttp.ClientSession() as client,
        ):
            async with client.get(
                "http://api.example.test/x", proxy=proxy.url, headers={"Via": "1.1 m2m-proxy"}
            ) as resp:
                assert resp.status == 508
            async with client.get(
                "http://api.example.test/x", proxy=proxy.url, headers={"Via": "1.1 other-proxy"}
            ) as resp:
                assert resp.status == 200
            async with client.request(
                "TRACE", "http://api.example.test/x", proxy=proxy.url
            ) as resp:
                assert resp.status == 405
    assert len(api.requests) == 1
