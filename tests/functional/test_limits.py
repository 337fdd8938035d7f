"""Hostile-input limits on real sockets: 413, 414, 431, slowloris 408, max_connections."""

from __future__ import annotations

import asyncio
import socket
import time

from aiohttp import web

from tests.functional.support import fake_server, running_proxy, token_answer


async def _idp(_request: web.Request) -> web.Response:
    return token_answer()


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.Response(text=str(len(body)))


def _routes(idp: str, api: str, proxy_extra: str = "") -> str:
    return f"""
proxy:
  max_body_bytes: 1000
  header_timeout_s: 0.5
  max_connections: 3
{proxy_extra}
clients:
  c:
    token_url: {idp}/token
    client_id: x
    client_secret: y
routes:
  - host: api.example.test
    client: c
    upstream: {api}
  - host: big.example.test
    client: c
    upstream: {api}
    max_body_bytes: 5000
"""


def _status(port: int, data: bytes, *, timeout: float = 5) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        line = sock.recv(4096).split(b"\r\n", 1)[0]
    return int(line.split()[1])


def _request(host: str, body: bytes = b"", *, chunked: bool = False, extra: str = "") -> bytes:
    head = f"POST http://{host}/x HTTP/1.1\r\nHost: {host}\r\n{extra}"
    if chunked:
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + (
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        )
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def test_body_size_limits_per_proxy_and_route() -> None:
    async with fake_server(_idp) as idp, fake_server(_echo) as api:
        async with running_proxy(_routes(idp.url, api.url)) as proxy:
            port = proxy.server.proxy_port
            statuses = [
                await asyncio.to_thread(_status, port, _request("api.example.test", b"a" * 1000)),
                await asyncio.to_thread(_status, port, _request("api.example.test", b"a" * 1001)),
                await asyncio.to_thread(
                    _status, port, _request("api.example.test", b"a" * 1001, chunked=True)
                ),
                await asyncio.to_thread(_status, port, _request("big.example.test", b"a" * 4000)),
                await asyncio.to_thread(
                    _status,
                    port,
                    _request("api.example.test", extra="Expect: 100-continue\r\n").replace(
                        b"Content-Length: 0", b"Content-Length: 999999"
                    ),
                ),
            ]
    assert statuses == [200, 413, 413, 200, 413]
    assert [r["body"] for r in api.requests] == [b"a" * 1000, b"a" * 4000]


async def test_oversized_heads_get_414_and_431() -> None:
    async with fake_server(_idp) as idp, fake_server(_echo) as api:
        async with running_proxy(_routes(idp.url, api.url)) as proxy:
            port = proxy.server.proxy_port
            long_uri = b"GET http://api.example.test/" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n"
            long_header = (
                b"GET http://api.example.test/ HTTP/1.1\r\nX: " + b"a" * 10000 + b"\r\n\r\n"
            )
            many = (
                b"GET http://api.example.test/ HTTP/1.1\r\n"
                + b"".join(b"X-%d: 1\r\n" % i for i in range(150))
                + b"\r\n"
            )
            statuses = [
                await asyncio.to_thread(_status, port, data)
                for data in (long_uri, long_header, many)
            ]
    assert statuses == [414, 431, 431]
    assert api.requests == []


async def test_a_slow_header_trickle_is_cut_off() -> None:
    async with fake_server(_idp) as idp, fake_server(_echo) as api:
        async with running_proxy(_routes(idp.url, api.url)) as proxy:

            def trickle() -> tuple[bytes, float]:
                started = time.monotonic()
                with socket.create_connection(("127.0.0.1", proxy.server.proxy_port)) as sock:
                    sock.settimeout(5)
                    try:
                        for byte in b"GET http://api.example.test/ HTTP/1.1\r\nX-Slow: yes":
                            sock.sendall(bytes([byte]))
                            time.sleep(0.05)
                    except OSError:
                        pass
                    try:
                        return sock.recv(4096), time.monotonic() - started
                    except OSError:
                        return b"", time.monotonic() - started

            answer, elapsed = await asyncio.to_thread(trickle)
    assert answer.startswith(b"HTTP/1.1 408 ") or answer == b""
    assert elapsed < 3  # not the ~2.5 s the full trickle would need plus a response
    assert api.requests == []


async def test_connections_over_max_connections_are_refused() -> None:
    async with fake_server(_idp) as idp, fake_server(_echo) as api:
        async with running_proxy(_routes(idp.url, api.url, "  client_idle_timeout_s: 30")) as proxy:
            port = proxy.server.proxy_port

            def connect_four() -> list[bytes]:
                """Three keep-alive connections stay open; the fourth is one too many."""
                socks, answers = [], []
                try:
                    for _ in range(4):
                        sock = socket.create_connection(("127.0.0.1", port), timeout=3)
                        socks.append(sock)
                        sock.sendall(_request("api.example.test", b"x"))
                        try:
                            answers.append(sock.recv(4096).split(b"\r\n", 1)[0])
                        except OSError:
                            answers.append(b"")
                finally:
                    for sock in socks:
                        sock.close()
                return answers

            answers = await asyncio.to_thread(connect_four)
            refusals = proxy.log_events("connection_refused")
    assert answers == [b"HTTP/1.1 200 OK"] * 3 + [b""]
    assert len(refusals) == 1
