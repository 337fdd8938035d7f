"""Planted secrets and tokens never appear in a response, an error or a log line.

The proxy runs as a real process (its real logging set-up, aiohttp's loggers
bridged) at debug level, and is driven through success, 401 replay, IdP
rejections and failures whose bodies echo the secret, and malformed requests.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.functional.support import (
    SENTINEL_SECRET,
    SENTINEL_TOKEN,
    fake_server,
    free_port,
    proxy_process,
)

SECOND_TOKEN = SENTINEL_TOKEN + "-second"


async def test_sentinel_secret_and_tokens_never_leak(tmp_path: Path) -> None:
    issued = 0

    async def idp(request: web.Request) -> web.Response:
        nonlocal issued
        if request.path == "/reject":
            return web.json_response(
                {"error": "invalid_client", "error_description": f"bad {SENTINEL_SECRET}"},
                status=401,
            )
        if request.path == "/fail":
            return web.Response(status=500, text=f"trace: secret={SENTINEL_SECRET}")
        issued += 1
        token = SENTINEL_TOKEN if issued == 1 else SECOND_TOKEN
        return web.json_response({"access_token": token, "token_type": "bearer"})

    async def api(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") == f"Bearer {SENTINEL_TOKEN}" and (
            request.path == "/expire"
        ):
            return web.Response(status=401, headers={"WWW-Authenticate": "Bearer"})
        return web.Response(text="ok")

    port, admin = free_port(), free_port()
    async with fake_server(idp) as idp_server, fake_server(api) as api_server:
        config = tmp_path / "routes.yaml"
        config.write_text(f"""
proxy:
  listen: 127.0.0.1:{port}
  admin_listen: 127.0.0.1:{admin}
  log_level: debug
  token_retries: 0
clients:
  good:
    token_url: {idp_server.url}/token
    client_id: good
    client_secret: ${{SENTINEL_SECRET}}
  rejected:
    token_url: {idp_server.url}/reject
    client_id: rejected
    client_secret: ${{SENTINEL_SECRET}}
    auth_method: client_secret_post
  failing:
    token_url: {idp_server.url}/fail
    client_id: failing
    client_secret: ${{SENTINEL_SECRET}}
routes:
  - host: good.test
    client: good
    upstream: {api_server.url}
  - host: rejected.test
    client: rejected
    upstream: {api_server.url}
  - host: failing.test
    client: failing
    upstream: {api_server.url}
""")
        out_file = tmp_path / "proxy.out"
        with out_file.open("wb") as out:
            async with proxy_process(config, admin, out):
                responses = await _drive(f"http://127.0.0.1:{port}", port)
    logs = out_file.read_text()
    assert "request_completed" in logs and "token_fetch_failed" in logs  # logs were written
    assert [r.split(b" ", 2)[1] for r in responses[:4]] == [b"200", b"200", b"502", b"502"]
    for needle in (SENTINEL_SECRET, SENTINEL_TOKEN):
        assert needle not in logs
        for response in responses:
            assert needle.encode() not in response


async def _drive(proxy: str, port: int) -> list[bytes]:
    """Every response as raw bytes (status line, headers, body)."""
    seen: list[bytes] = []
    async with aiohttp.ClientSession() as client:
        for url in (
            "http://good.test/hello",
            "http://good.test/expire",  # 401 → refresh → replay with the second token
            "http://rejected.test/x",
            "http://failing.test/x",
            "http://unknown.test/x",
        ):
            async with client.get(url, proxy=proxy) as resp:
                head = f"HTTP/1.1 {resp.status} {resp.reason}\r\n".encode()
                head += b"".join(f"{k}: {v}\r\n".encode() for k, v in resp.headers.items())
                seen.append(head + b"\r\n" + await resp.read())
    for raw in (
        f"GET http://good.test/ HTTP/1.1\r\nHost: good.test\r\n"
        f"Authorization: Bearer {SENTINEL_TOKEN}\r\nBad\x01Header: {SENTINEL_SECRET}\r\n\r\n",
        f"GET http://good.test/ HTTP/1.1\r\nHost: good.test\r\nContent-Length: 5\r\n"
        f"Transfer-Encoding: chunked\r\nX-Secret: {SENTINEL_SECRET}\r\n\r\n0\r\n\r\n",
        f"BOGUS {SENTINEL_SECRET} HTTP/1.1\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw.encode("latin-1"))
        await writer.drain()
        seen.append(await asyncio.wait_for(reader.read(65536), 5))
        writer.close()
    return seen
