"""Protocol upgrades on routes that allow them (``upgrades: [websocket]``): a real
WebSocket exchange through the proxy, and raw-socket cases for what must never pass.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from tests.functional.support import (
    SENTINEL_SECRET,
    SENTINEL_TOKEN,
    RunningProxy,
    fake_server,
    running_proxy,
    token_answer,
)

BEARER = f"Bearer {SENTINEL_TOKEN}"
WS_HOST = "ws.example.com"
PLAIN_HOST = "plain.example.com"
HANDSHAKE = (
    "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
)


def routes(idp: str, ws_upstream: str, plain_upstream: str | None = None, extra: str = "") -> str:
    plain = (
        f"  - host: {PLAIN_HOST}\n    client: svc\n    upstream: {plain_upstream}\n"
        if plain_upstream
        else ""
    )
    return f"""
proxy:
  unmatched: deny
  log_level: debug
{extra}
clients:
  svc:
    token_url: {idp}/token
    client_id: svc
    client_secret: ${{SENTINEL_SECRET}}
routes:
  - host: {WS_HOST}
    client: svc
    upstream: {ws_upstream}
    upgrades: [WebSocket]
{plain}"""


def assert_no_leak(proxy: RunningProxy, *seen: bytes) -> None:
    logs = proxy.logs.getvalue().encode()
    for needle in (SENTINEL_SECRET.encode(), SENTINEL_TOKEN.encode()):
        assert needle not in logs
        for data in seen:
            assert needle not in data


@asynccontextmanager
async def ws_stack(extra: str = "") -> AsyncIterator[tuple[RunningProxy, list[str]]]:
    """The proxy with a WebSocket echo upstream that checks the Bearer token."""
    authorizations: list[str] = []

    async def idp(_request: web.Request) -> web.Response:
        return token_answer()

    async def echo(request: web.Request) -> web.StreamResponse:
        authorizations.append(request.headers.get("Authorization", ""))
        if request.headers.get("Authorization") != BEARER:
            return web.Response(status=401)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await ws.send_str(f"echo:{msg.data}")
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    async with fake_server(idp) as idp_server, fake_server(echo) as upstream:
        async with running_proxy(routes(idp_server.url, upstream.url, extra=extra)) as proxy:
            yield proxy, authorizations


async def _talk(ws: aiohttp.ClientWebSocketResponse) -> None:
    await ws.send_str("hello")
    assert (await ws.receive(timeout=5)).data == "echo:hello"
    await ws.send_bytes(b"\x00\x01abc")
    assert (await ws.receive(timeout=5)).data == b"cba\x01\x00"
    big = "x" * 300_000  # more than one socket buffer each way
    await ws.send_str(big)
    assert (await ws.receive(timeout=10)).data == "echo:" + big
    await ws.close()


async def test_a_websocket_works_through_the_proxy_with_the_routes_token() -> None:
    async with ws_stack() as (proxy, authorizations), aiohttp.ClientSession() as session:
        async with session.ws_connect(f"http://{WS_HOST}/chat", proxy=proxy.url) as ws:
            await _talk(ws)
        assert authorizations == [BEARER]
        await asyncio.sleep(0.1)
        completed = proxy.log_events("request_completed")
        assert [(e["status"], e["route"]) for e in completed] == [(101, WS_HOST)], completed
        assert_no_leak(proxy)


async def test_a_websocket_works_in_host_mode() -> None:
    async with ws_stack() as (proxy, authorizations), aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{proxy.url}/chat", headers={"Host": WS_HOST}) as ws:
            await _talk(ws)
        assert authorizations == [BEARER]


async def test_the_upstream_closing_the_websocket_ends_the_relay() -> None:
    async with ws_stack() as (proxy, _), aiohttp.ClientSession() as session:
        async with session.ws_connect(f"http://{WS_HOST}/chat", proxy=proxy.url) as ws:
            await ws.send_str("hi")
            assert (await ws.receive(timeout=5)).data == "echo:hi"
        # A second websocket on a fresh connection still works (nothing was pooled).
        async with session.ws_connect(f"http://{WS_HOST}/chat", proxy=proxy.url) as ws:
            await _talk(ws)
        await asyncio.sleep(0.1)
        assert [e["status"] for e in proxy.log_events("request_completed")] == [101, 101]


# -- raw sockets ------------------------------------------------------------------------


@dataclass
class RawSwitchUpstream:
    """Reads one request head per connection, records it, answers ``answer(head)``;
    after a 101 it echoes what it receives, upper-cased, until the peer closes."""

    answer: Callable[[bytes], bytes]
    port: int = 0
    heads: list[bytes] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                self.heads.append(head)
                reply = self.answer(head)
                writer.write(reply)
                if reply.startswith(b"HTTP/1.1 101"):
                    while data := await reader.read(65536):
                        writer.write(data.upper())
                    return
        except ConnectionError:
            return
        finally:
            self.closed.set()
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@asynccontextmanager
async def raw_stack(
    answer: Callable[[bytes], bytes], extra: str = ""
) -> AsyncIterator[tuple[RunningProxy, RawSwitchUpstream]]:
    upstream = RawSwitchUpstream(answer)

    async def idp(_request: web.Request) -> web.Response:
        return token_answer()

    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    upstream.port = int(server.sockets[0].getsockname()[1])
    try:
        async with (
            fake_server(idp) as idp_server,
            running_proxy(routes(idp_server.url, upstream.url, upstream.url, extra)) as proxy,
        ):
            yield proxy, upstream
    finally:
        server.close()
        await server.wait_closed()


SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nKeep-Alive: timeout=5\r\n\r\n"
)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def _open(
    proxy: RunningProxy, host: str, extra: str = HANDSHAKE
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.server.proxy_port)
    writer.write(f"GET http://{host}/chat HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode())
    return reader, writer


async def test_after_a_101_bytes_are_relayed_raw_and_the_client_never_sees_the_token() -> None:
    async with raw_stack(lambda _head: SWITCH) as (proxy, upstream):
        reader, writer = await _open(proxy, WS_HOST)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 "), head
        lower = head.lower()
        assert b"\r\nupgrade: websocket\r\n" in lower
        assert b"\r\nconnection: upgrade\r\n" in lower
        assert b"sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=" in lower
        assert b"keep-alive" not in lower
        assert b"content-length" not in lower and b"transfer-encoding" not in lower
        writer.write(b"raw bytes \x00\xff")
        assert await asyncio.wait_for(reader.readexactly(12), 5) == b"RAW BYTES \x00\xff"
        sent = upstream.heads[0].lower()
        assert f"authorization: {BEARER.lower()}".encode() in sent
        assert b"\r\nupgrade: websocket\r\n" in sent
        assert b"\r\nconnection: upgrade\r\n" in sent
        writer.close()
        await writer.wait_closed()
        assert_no_leak(proxy, head)


async def test_the_client_closing_mid_relay_closes_the_upstream_side() -> None:
    async with raw_stack(lambda _head: SWITCH) as (proxy, upstream):
        reader, writer = await _open(proxy, WS_HOST)
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"PING"
        writer.close()
        await writer.wait_closed()
        await asyncio.wait_for(upstream.closed.wait(), 5)
        await asyncio.sleep(0.1)
        completed = proxy.log_events("request_completed")
        assert [e["status"] for e in completed] == [101], completed


async def test_upgrade_is_stripped_on_a_route_without_the_allowance() -> None:
    async with raw_stack(lambda _head: OK) as (proxy, upstream):
        reader, writer = await _open(proxy, PLAIN_HOST)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert await reader.readexactly(2) == b"ok"
        sent = upstream.heads[0].lower()
        assert b"upgrade" not in sent, sent
        assert f"authorization: {BEARER.lower()}".encode() in sent
        # The connection goes on as HTTP/1.1 (the declined upgrade is an ordinary request).
        writer.write(
            f"GET http://{PLAIN_HOST}/again HTTP/1.1\r\nHost: {PLAIN_HOST}\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 "), head
        writer.close()
        await writer.wait_closed()


async def test_an_unrequested_101_on_a_route_without_the_allowance_is_a_502() -> None:
    async with raw_stack(lambda _head: SWITCH) as (proxy, _upstream):
        reader, writer = await _open(proxy, PLAIN_HOST)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 502 "), head
        writer.close()
        await writer.wait_closed()


@pytest.mark.parametrize(
    "upgrade", ["h2c", "h2c, websocket", "HTTP/2.0"], ids=["h2c", "h2c-first", "http2"]
)
async def test_h2c_is_never_forwarded(upgrade: str) -> None:
    async with raw_stack(lambda _head: OK) as (proxy, upstream):
        extra = (
            f"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: {upgrade}\r\n"
            "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
        )
        reader, writer = await _open(proxy, WS_HOST, extra)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 "), head
        sent = upstream.heads[0].lower()
        assert b"h2c" not in sent and b"http2-settings" not in sent, sent
        if "websocket" in upgrade:
            assert b"\r\nupgrade: websocket\r\n" in sent
        else:
            assert b"upgrade" not in sent
        writer.close()
        await writer.wait_closed()


async def test_a_101_to_another_protocol_is_a_502() -> None:
    other = SWITCH.replace(b"Upgrade: websocket", b"Upgrade: h2c")
    async with raw_stack(lambda _head: other) as (proxy, _upstream):
        reader, writer = await _open(proxy, WS_HOST)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 502 "), head
        writer.close()
        await writer.wait_closed()
        assert_no_leak(proxy, head)


async def test_a_non_101_answer_to_an_upgrade_is_passed_on_as_usual() -> None:
    async with raw_stack(lambda _head: OK) as (proxy, upstream):
        reader, writer = await _open(proxy, WS_HOST)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert await reader.readexactly(2) == b"ok"
        assert b"\r\nupgrade: websocket\r\n" in upstream.heads[0].lower()
        writer.close()
        await writer.wait_closed()


async def test_a_401_to_an_upgrade_is_replayed_once_with_a_fresh_token() -> None:
    answers = iter([b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n", SWITCH])
    async with raw_stack(lambda _head: next(answers)) as (proxy, upstream):
        reader, writer = await _open(proxy, WS_HOST)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 "), head
        writer.write(b"after-replay")
        assert await asyncio.wait_for(reader.readexactly(12), 5) == b"AFTER-REPLAY"
        assert len(upstream.heads) == 2
        assert all(b"\r\nupgrade: websocket\r\n" in h.lower() for h in upstream.heads)
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.1)
        completed = proxy.log_events("request_completed")
        assert [(e["status"], e["retried"]) for e in completed] == [(101, "recovered")]


async def test_an_idle_switched_connection_is_closed_after_tunnel_idle_timeout() -> None:
    idle = "  tunnel_idle_timeout_s: 0.5\n"
    async with raw_stack(lambda _head: SWITCH, idle) as (proxy, upstream):
        reader, writer = await _open(proxy, WS_HOST)
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.write(b"x")
        assert await asyncio.wait_for(reader.readexactly(1), 5) == b"X"
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        await asyncio.wait_for(upstream.closed.wait(), 5)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        await asyncio.sleep(0.1)
        assert [e["status"] for e in proxy.log_events("request_completed")] == [101]
