"""A 200 MB response streams through a proxy process with bounded memory."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import psutil
from dev_stack import DevStack

from tests.functional.conftest import RESOURCE
from tests.functional.support import free_port, proxy_process

SIZE = 200 * 1024 * 1024


async def test_200mb_response_streams_with_small_rss_growth(
    stack: DevStack, tmp_path: Path
) -> None:
    port, admin = free_port(), free_port()
    config = tmp_path / "routes.yaml"
    config.write_text(f"""
proxy:
  listen: 127.0.0.1:{port}
  admin_listen: 127.0.0.1:{admin}
clients:
  basic:
    token_url: {stack.token_url}
    client_id: svc-basic
    client_secret: ${{SENTINEL_SECRET}}
routes:
  - host: api.demo.local
    client: basic
    scope: read
    resource: {RESOURCE}
    upstream: {stack.api_url}
""")
    async with proxy_process(config, admin) as proc:
        process = psutil.Process(proc.pid)
        proxy = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as client:
            async with client.get("http://api.demo.local/warm", proxy=proxy) as resp:
                assert resp.status == 200
            baseline = process.memory_info().rss
            peak = baseline
            received = 0
            async with client.get(
                f"http://api.demo.local/stream?bytes={SIZE}", proxy=proxy
            ) as resp:
                assert resp.status == 200
                async for chunk in resp.content.iter_chunked(1 << 20):
                    received += len(chunk)
                    peak = max(peak, process.memory_info().rss)
                    await asyncio.sleep(0)  # a slow-ish reader: backpressure must hold
    assert received == SIZE
    growth_mb = (peak - baseline) / (1024 * 1024)
    assert growth_mb < 50, f"RSS grew by {growth_mb:.1f} MB"
