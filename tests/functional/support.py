"""Shared helpers for functional tests: an in-process proxy, fake servers, clients."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from aiohttp import web

from m2m_proxy.app import ProxyServer
from m2m_proxy.config import parse_config
from m2m_proxy.logs import make_logs

# Planted in every functional config; test_no_leaks greps responses and logs for them.
SENTINEL_SECRET = "sentinel-secret-4f1d0c9e"
SENTINEL_TOKEN = "sentinel-token-8b2e77aa"


@dataclass
class RunningProxy:
    server: ProxyServer
    logs: io.StringIO

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.proxy_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.server.admin_port}"

    def log_events(self, event: str | None = None) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.logs.getvalue().splitlines() if line]
        return [e for e in lines if event is None or e.get("event") == event]


@asynccontextmanager
async def running_proxy(
    yaml_text: str, environ: dict[str, str] | None = None
) -> AsyncIterator[RunningProxy]:
    """Start the proxy in this event loop on ephemeral ports, from a routes file text."""
    header = "proxy:\n  listen: 127.0.0.1:0\n  admin_listen: 127.0.0.1:0\n"
    text = textwrap.dedent(yaml_text)
    text = text.replace("proxy:\n", header, 1) if "proxy:" in text else header + text
    env = {"SENTINEL_SECRET": SENTINEL_SECRET, **(environ or {})}
    config = parse_config(text, "test-routes.yaml", env)
    logs = io.StringIO()
    server = ProxyServer(config, make_logs("debug", stream=logs, json_output=True))
    await server.start()
    try:
        yield RunningProxy(server, logs)
    finally:
        await server.stop()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class FakeServer:
    """An aiohttp server on 127.0.0.1 with a request log, for fault injection."""

    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    connections: int = 0


@asynccontextmanager
async def fake_server(handler: Handler) -> AsyncIterator[FakeServer]:
    state = FakeServer(url="")

    async def recording(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        state.requests.append(
            {
                "method": request.method,
                "path": request.raw_path,
                "headers": list(request.headers.items()),
                "body": body,
            }
        )
        return await handler(request)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", recording)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.url = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()


def token_answer(token: str = SENTINEL_TOKEN, expires_in: int = 300) -> web.Response:
    return web.json_response(
        {"access_token": token, "token_type": "Bearer", "expires_in": expires_in}
    )


async def run_cli(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run a command (curl, python) without blocking the loop the proxy runs in."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def proxy_process(
    config: Path, admin_port: int, output: IO[bytes] | int = subprocess.DEVNULL
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """``python -m m2m_proxy run`` as a real process, ready when this yields."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "m2m_proxy", "run", "--config", str(config)],
        env={**os.environ, "SENTINEL_SECRET": SENTINEL_SECRET},
        stdout=output,
        stderr=subprocess.STDOUT,
    )
    try:
        await asyncio.to_thread(_wait_ready, f"http://127.0.0.1:{admin_port}/readyz", proc)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 20) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the proxy exited with code {proc.returncode}")
        try:
            with opener.open(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("the proxy did not become ready")
