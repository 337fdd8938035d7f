"""A 200 MB response streams through a proxy process with bounded memory."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import psutil
from dev_stack import DevStack

from tests.functional.conftest import RESOURCE
from tests.functional.support import SENTINEL_SECRET

SIZE = 200 * 1024 * 1024


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"proxy exited with {proc.returncode}")
        try:
            with opener.open(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("proxy not ready")


async def test_200mb_response_streams_with_small_rss_growth(
    stack: DevStack, tmp_path: Path
) -> None:
    port, admin = _free_port(), _free_port()
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
    proc = subprocess.Popen(
        [sys.executable, "-m", "m2m_proxy", "run", "--config", str(config)],
        env={**os.environ, "SENTINEL_SECRET": SENTINEL_SECRET},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await asyncio.to_thread(_wait_ready, f"http://127.0.0.1:{admin}/readyz", proc)
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
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert received == SIZE
    growth_mb = (peak - baseline) / (1024 * 1024)
    assert growth_mb < 50, f"RSS grew by {growth_mb:.1f} MB"
