"""Changing the proxy without downtime: config reload (SIGHUP, --watch) and graceful
shutdown, against the real dev stack."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from dev_stack import DevStack

from m2m_proxy.config import ConfigError, parse_config
from tests.functional.conftest import RESOURCE, routes_for
from tests.functional.support import (
    SENTINEL_SECRET,
    fake_server,
    free_port,
    running_proxy,
)

EXTRA_ROUTE = """
  - host: extra.demo.local
    client: basic
    scope: read
    resource: {resource}
    upstream: {upstream}
"""


@pytest.fixture(autouse=True)
def sentinel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload reads the file with the process environment, like the real proxy.
    The reloaded files carry no proxy addresses: a reload keeps the bound listeners."""
    monkeypatch.setenv("SENTINEL_SECRET", SENTINEL_SECRET)


def write(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    return str(path)


async def get(client: aiohttp.ClientSession, proxy: str, url: str) -> int:
    async with client.get(url, proxy=proxy) as resp:
        await resp.read()
        return resp.status


async def test_a_valid_reload_swaps_routes_and_keeps_unchanged_tokens(
    stack: DevStack, tmp_path: Path
) -> None:
    base = routes_for(stack)
    async with running_proxy(base) as proxy, aiohttp.ClientSession() as client:
        assert await get(client, proxy.url, "http://api.demo.local/a") == 200
        assert await get(client, proxy.url, "http://extra.demo.local/a") == 403
        extra = EXTRA_ROUTE.format(resource=RESOURCE, upstream=stack.api_url)
        path = write(tmp_path / "routes.yaml", base + extra)
        assert proxy.server.reload(path)
        assert await get(client, proxy.url, "http://extra.demo.local/b") == 200
        assert await get(client, proxy.url, "http://api.demo.local/c") == 200
        events = proxy.log_events("request_completed")
        [reloaded] = proxy.log_events("config_reloaded")
    assert reloaded["changed_clients"] == []
    # the file names no listeners (defaults), the running proxy has ephemeral ones:
    # reported, not applied
    assert reloaded["restart_required"] == ["listen", "admin_listen"]
    # the basic client's token survived the reload: one IdP request for api + one for
    # extra (another scope), none for api.demo.local after the reload
    assert [e["token_cache"] for e in events] == ["miss", "none", "miss", "hit"]
    assert len(stack.token_requests()) == 2


async def test_an_invalid_reload_keeps_the_running_config(stack: DevStack, tmp_path: Path) -> None:
    async with running_proxy(routes_for(stack)) as proxy, aiohttp.ClientSession() as client:
        path = write(tmp_path / "routes.yaml", "routes:\n  - host: x.example\n    client: nope\n")
        assert not proxy.server.reload(path)
        assert await get(client, proxy.url, "http://api.demo.local/a") == 200
        [failed] = proxy.log_events("config_reload_failed")
        async with client.get(f"{proxy.admin_url}/metrics") as resp:
            metrics = await resp.text()
    assert failed["problems"] == [
        f"{path}:3:13: routes[0].client: unknown client 'nope'; "
        "define it under the top-level 'clients:' section"
    ]
    assert 'm2m_proxy_config_reloads_total{outcome="failure"} 1.0' in metrics


async def test_a_changed_client_loses_its_tokens(stack: DevStack, tmp_path: Path) -> None:
    base = routes_for(stack)
    async with running_proxy(base) as proxy, aiohttp.ClientSession() as client:
        assert await get(client, proxy.url, "http://api.demo.local/a") == 200
        changed = base.replace(
            "client_id: svc-basic\n", "client_id: svc-basic\n    token_params: {x: y}\n", 1
        )
        assert proxy.server.reload(write(tmp_path / "routes.yaml", changed))
        assert await get(client, proxy.url, "http://api.demo.local/b") == 200
        [reloaded] = proxy.log_events("config_reloaded")
    assert reloaded["changed_clients"] == ["basic"]
    assert len(stack.token_requests()) == 2
    assert stack.token_requests()[1]["form"]["x"] == "y"


async def test_watch_reloads_after_a_configmap_style_symlink_swap(
    stack: DevStack, tmp_path: Path
) -> None:
    base = routes_for(stack)
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    write(tmp_path / "v1" / "routes.yaml", base)
    extra = EXTRA_ROUTE.format(resource=RESOURCE, upstream=stack.api_url)
    write(tmp_path / "v2" / "routes.yaml", base + extra)
    (tmp_path / "..data").symlink_to("v1")
    (tmp_path / "routes.yaml").symlink_to("..data/routes.yaml")
    async with running_proxy(routes_for(stack)) as proxy, aiohttp.ClientSession() as client:
        watcher = asyncio.get_running_loop().create_task(
            proxy.server.watch(str(tmp_path / "routes.yaml"), interval_s=0.05)
        )
        try:
            assert await get(client, proxy.url, "http://extra.demo.local/a") == 403
            (tmp_path / "..data_tmp").symlink_to("v2")
            os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
            for _ in range(100):
                if proxy.log_events("config_reloaded"):
                    break
                await asyncio.sleep(0.05)
            assert await get(client, proxy.url, "http://extra.demo.local/a") == 200
        finally:
            watcher.cancel()


async def test_shutdown_lets_the_request_in_flight_finish(stack: DevStack) -> None:
    release = asyncio.Event()

    async def slow(_request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="finished")

    async with fake_server(slow) as upstream:
        routes = routes_for(stack).replace(
            f"upstream: {stack.api_url}", f"upstream: {upstream.url}", 1
        )
        async with running_proxy(routes) as proxy, aiohttp.ClientSession() as client:
            in_flight = asyncio.get_running_loop().create_task(
                _read(client, proxy.url, "http://api.demo.local/slow")
            )
            while not upstream.requests:
                await asyncio.sleep(0.01)
            stopping = asyncio.get_running_loop().create_task(proxy.server.stop())
            await asyncio.sleep(0.2)
            assert not proxy.server.runtime.readiness.ready  # at once
            with pytest.raises(aiohttp.ClientError):  # no longer accepting
                await _read(client, proxy.url, "http://api.demo.local/late")
            release.set()
            assert await in_flight == (200, "finished")
            await stopping


async def _read(client: aiohttp.ClientSession, proxy: str, url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as fresh, fresh.get(url, proxy=proxy) as resp:
        return resp.status, await resp.text()


async def test_sigterm_drains_and_sighup_reloads_a_real_process(
    stack: DevStack, tmp_path: Path
) -> None:
    port, admin = free_port(), free_port()
    config = write(
        tmp_path / "routes.yaml",
        routes_for(stack).replace(
            "proxy:\n",
            f"proxy:\n  listen: 127.0.0.1:{port}\n  admin_listen: 127.0.0.1:{admin}\n",
            1,
        ),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "m2m_proxy", "run", "--config", config],
        env={**os.environ, "SENTINEL_SECRET": SENTINEL_SECRET},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        async with aiohttp.ClientSession() as client:
            for _ in range(200):
                try:
                    async with client.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            proxy = f"http://127.0.0.1:{port}"
            assert await get(client, proxy, "http://extra.demo.local/a") == 403
            extra = EXTRA_ROUTE.format(resource=RESOURCE, upstream=stack.api_url)
            Path(config).write_text(Path(config).read_text() + extra)
            proc.send_signal(signal.SIGHUP)
            for _ in range(100):
                if await get(client, proxy, "http://extra.demo.local/a") == 200:
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("SIGHUP did not reload the routes file")
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    text = out.decode()
    assert '"event": "config_reloaded"' in text
    assert '"event": "shutdown_completed"' in text


def test_environment_overrides_listen_and_log_level() -> None:
    config = parse_config(
        "proxy:\n  listen: 127.0.0.1:8080\n",
        "routes.yaml",
        {"M2M_PROXY_LISTEN": "0.0.0.0:9000", "M2M_PROXY_LOG_LEVEL": "DEBUG"},
    )
    assert (config.proxy.listen.host, config.proxy.listen.port) == ("0.0.0.0", 9000)
    assert config.proxy.log_level == "debug"
    with pytest.raises(ConfigError) as info:
        parse_config("{}", "routes.yaml", {"M2M_PROXY_ADMIN_LISTEN": "nope"})
    assert str(info.value).startswith("routes.yaml: M2M_PROXY_ADMIN_LISTEN (environment): ")
