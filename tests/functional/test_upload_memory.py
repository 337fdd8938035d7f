"""A 200 MB upload streams through a proxy process (lean upstream client) to a slow
upstream with bounded memory: the client is held back, nothing piles up in between."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psutil
from aiohttp import web

from tests.functional.support import fake_server, free_port, proxy_process, token_answer

SIZE = 200 * 1024 * 1024
PIECE = 256 * 1024


async def test_200mb_upload_to_a_slow_upstream_streams_with_small_rss_growth(
    tmp_path: Path,
) -> None:
    received = 0
    digest = hashlib.sha256()

    async def idp(_request: web.Request) -> web.Response:
        return token_answer()

    async def upstream(request: web.Request) -> web.Response:
        nonlocal received
        if request.path != "/upload":
            return web.json_response({"len": len(await request.read())})
        async for chunk in request.content.iter_chunked(PIECE):
            received += len(chunk)
            digest.update(chunk)
            await asyncio.sleep(0.0005)  # slower than the client can send
        return web.json_response({"len": received})

    async def body() -> AsyncIterator[bytes]:
        piece = bytes(range(256)) * (PIECE // 256)
        for _ in range(SIZE // PIECE):
            yield piece

    app = web.Application()  # reads the body as a stream (fake_server buffers it)
    app.router.add_route("*", "/{tail:.*}", upstream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    api_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    async with fake_server(idp) as token_server:
        port, admin = free_port(), free_port()
        config = tmp_path / "routes.yaml"
        config.write_text(f"""
proxy:
  listen: 127.0.0.1:{port}
  admin_listen: 127.0.0.1:{admin}
  upstream_client: lean
  max_body_bytes: null
clients:
  svc:
    token_url: {token_server.url}/token
    client_id: svc
    client_secret: ${{SENTINEL_SECRET}}
routes:
  - host: api.test
    client: svc
    upstream: {api_url}
""")
        async with proxy_process(config, admin) as proc:
            process = psutil.Process(proc.pid)
            proxy = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as client:
                async with client.post("http://api.test/warm", proxy=proxy, data=b"x") as resp:
                    assert resp.status == 200
                baseline = process.memory_info().rss
                peak = baseline

                async def watch() -> None:
                    nonlocal peak
                    while True:
                        peak = max(peak, process.memory_info().rss)
                        await asyncio.sleep(0.05)

                watcher = asyncio.get_running_loop().create_task(watch())
                try:
                    async with client.post(
                        "http://api.test/upload", proxy=proxy, data=body()
                    ) as resp:
                        assert resp.status == 200
                        result = await resp.json()
                finally:
                    watcher.cancel()
    await runner.cleanup()
    expected = hashlib.sha256()
    for _ in range(SIZE // PIECE):
        expected.update(bytes(range(256)) * (PIECE // 256))
    assert result == {"len": SIZE}
    assert digest.hexdigest() == expected.hexdigest()
    growth_mb = (peak - baseline) / (1024 * 1024)
    assert growth_mb < 50, f"RSS grew by {growth_mb:.1f} MB"
