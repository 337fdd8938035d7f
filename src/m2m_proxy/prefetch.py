"""Prefetcher: tokens of ``prefetch: true`` clients fetched at start, and readiness.

Each credential the routes use for such a client is one readiness condition,
named after it (``token:orders scope=read``); it is satisfied once a token is
held. A failed fetch is retried after the token cache's hold (its Retry-After),
in the background, until it succeeds or the proxy stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from m2m_proxy.admin import Readiness
from m2m_proxy.errors import TokenError
from m2m_proxy.tasks import TaskSet
from m2m_proxy.tokens.cache import TokenCache
from m2m_proxy.tokens.model import CredentialKey


def condition(key: CredentialKey) -> str:
    """The readiness condition of a credential, readable in /readyz."""
    parts = [f"token:{key.client}"]
    if key.scope:
        parts.append("scope=" + ",".join(key.scope))
    if key.audience:
        parts.append(f"audience={key.audience}")
    if key.resource:
        parts.append(f"resource={key.resource}")
    return " ".join(parts)


class Prefetcher:
    def __init__(
        self, tokens: TokenCache, keys: Iterable[CredentialKey], readiness: Readiness
    ) -> None:
        self._tokens = tokens
        self._keys = tuple(dict.fromkeys(keys))
        self._readiness = readiness
        self._tasks = TaskSet()

    def start(self) -> None:
        for key in self._keys:
            self._readiness.withdraw(condition(key))
            self._tasks.start(self._warm(key), name="token-prefetch")

    async def close(self) -> None:
        await self._tasks.cancel_all()

    async def _warm(self, key: CredentialKey) -> None:
        while True:
            try:
                await self._tokens.obtain(key)
            except TokenError as exc:  # logged by the cache's on_failed
                await asyncio.sleep(max(exc.retry_after_s or 1.0, 0.1))
                continue
            self._readiness.satisfy(condition(key))
            return
