"""Zero-downtime secret rotation against the real IdP: the IdP is switched to a new
secret in the middle of steady load, and no client request fails.

Two ways to rotate: both secrets listed (the proxy tries the next one on
invalid_client and keeps it), or one secret file in a Kubernetes-style volume whose
``..data`` symlink is swapped (the proxy sees the new file and drops tokens minted
with the old secret)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from dev_stack import DevStack

from tests.functional.conftest import RESOURCE, ROOT
from tests.functional.support import running_proxy

TTL_S = 3
OLD, NEW = "old-secret-5d1e", "new-secret-9a4c"


@pytest.fixture(scope="module")
def rotation_stack() -> Iterator[DevStack]:
    clients = [
        {
            "client_id": name,
            "client_secret": OLD,
            "token_endpoint_auth_method": "client_secret_post",
        }
        for name in ("svc-list", "svc-file")
    ]
    resources: dict[str, dict[str, object]] = {RESOURCE: {"scope": "read", "ttl_s": TTL_S}}
    with DevStack(ROOT, clients=clients, resources=resources, token_ttl_s=TTL_S) as stack:
        yield stack


async def _steady_load(
    proxy_url: str, seconds: float, events: dict[float, Callable[[], Awaitable[None]]]
) -> list[int]:
    """4 workers for ``seconds``; each event runs once when its time (from start) comes."""
    statuses: list[int] = []
    start = time.monotonic()

    async def worker(client: aiohttp.ClientSession) -> None:
        while time.monotonic() - start < seconds:
            async with client.get("http://api.demo.local/r", proxy=proxy_url) as resp:
                await resp.read()
                statuses.append(resp.status)
            await asyncio.sleep(0.05)

    async def timeline() -> None:
        for at, action in sorted(events.items()):
            await asyncio.sleep(max(0.0, at - (time.monotonic() - start)))
            await action()

    async with aiohttp.ClientSession() as client:
        await asyncio.gather(timeline(), *(worker(client) for _ in range(4)))
    return statuses


def _routes(stack: DevStack, client_id: str, secret_lines: str, proxy_extra: str = "") -> str:
    return f"""
proxy:
  unmatched: deny
{proxy_extra}
clients:
  rotating:
    token_url: {stack.token_url}
    client_id: {client_id}
    auth_method: client_secret_post
{secret_lines}
routes:
  - host: api.demo.local
    client: rotating
    scope: read
    resource: {RESOURCE}
    upstream: {stack.api_url}
"""


async def test_listed_secrets_survive_the_idp_switching_mid_run(rotation_stack: DevStack) -> None:
    stack = rotation_stack
    stack.reset()
    routes = _routes(stack, "svc-list", '    client_secret: ["${OLD}", "${NEW}"]')

    async def switch() -> None:
        await asyncio.to_thread(stack.rotate_secret, "svc-list", NEW)

    async with running_proxy(routes, {"OLD": OLD, "NEW": NEW}) as proxy:
        statuses = await _steady_load(proxy.url, 8.0, {2.0: switch})
    assert statuses and set(statuses) == {200}
    sent = [(r["form"]["client_secret"], r["status"]) for r in stack.token_requests()]
    # old secret works, then is refused once, and the new one is kept from then on
    assert sent[0] == (OLD, 200)
    refused = sent.index((OLD, 401))
    assert sent[refused + 1 :] == [(NEW, 200)] * len(sent[refused + 1 :])
    assert len(sent[refused + 1 :]) >= 2


class SecretVolume:
    """A Kubernetes-style secret volume: ``secret`` → ``..data/secret``, ``..data`` swapped."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.generation = 0
        (root / "secret").symlink_to("..data/secret")

    def publish(self, value: str) -> None:
        self.generation += 1
        target = self.root / f"..gen_{self.generation}"
        target.mkdir()
        (target / "secret").write_text(value)
        (self.root / "..data_tmp").symlink_to(target.name)
        os.replace(self.root / "..data_tmp", self.root / "..data")


async def test_a_swapped_secret_file_survives_the_idp_switching_mid_run(
    rotation_stack: DevStack, tmp_path: Path
) -> None:
    stack = rotation_stack
    stack.reset()
    volume = SecretVolume(tmp_path)
    volume.publish(OLD)
    routes = _routes(
        stack,
        "svc-file",
        f"    client_secret_file: {volume.root / 'secret'}",
        proxy_extra="  credential_files_check_s: 0.3",
    )

    async def switch_idp() -> None:
        await asyncio.to_thread(stack.rotate_secret, "svc-file", NEW)

    async def swap_file() -> None:
        volume.publish(NEW)

    async with running_proxy(routes) as proxy:
        statuses = await _steady_load(proxy.url, 8.0, {2.0: switch_idp, 2.5: swap_file})
        changed = proxy.log_events("client_credentials_changed")
    assert statuses and set(statuses) == {200}
    assert [e["client"] for e in changed] == ["rotating"]
    sent = [(r["form"]["client_secret"], r["status"]) for r in stack.token_requests()]
    first_new = sent.index((NEW, 200))
    assert all(secret == OLD for secret, _ in sent[:first_new])
    assert all(entry == (NEW, 200) for entry in sent[first_new:])
    assert len(sent[first_new:]) >= 2  # tokens kept coming with the new secret
