"""Fixtures of the hostile suite: a fresh rig (IdP, two capture upstreams, proxy) per test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.security.rig import Rig, running_rig


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    async with running_rig() as running:
        yield running
