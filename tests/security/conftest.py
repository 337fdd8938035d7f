"""Fixtures of the hostile suite: a fresh rig (IdP, two capture upstreams, proxy) per
test, once per upstream HTTP client the proxy offers (``proxy.upstream_client``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.security.rig import Rig, running_rig, upstream_clients


@pytest.fixture(params=upstream_clients(), ids=lambda client: client or "default")
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    async with running_rig(upstream_client=request.param) as running:
        yield running
