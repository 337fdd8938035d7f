"""TokenCache: cached tokens per credential, one fetch in flight per credential.

The hot path is :meth:`TokenCache.peek`: a dict lookup and a clock compare, no
await. A token is fresh until ``renew_at``; from then until ``expires_at`` it is
still served while one background fetch replaces it. :meth:`obtain` is the slow
path: every caller for the same credential awaits the same shielded fetch task,
so a burst of N cold requests or N 401s costs one IdP call, and a caller that goes
away never cancels it for the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from m2m_proxy.errors import TokenError
from m2m_proxy.tasks import TaskSet
from m2m_proxy.tokens.model import CredentialKey, Token, TokenGrant, make_token

Fetch = Callable[[CredentialKey], Awaitable[TokenGrant]]
Clock = Callable[[], float]


class TokenCache:
    def __init__(
        self,
        fetch: Fetch,
        *,
        clock: Clock,
        skew_s: float,
        default_lifetime_s: float,
        failure_hold_s: float,
        on_fetched: Callable[[CredentialKey, Token], None] | None = None,
        on_failed: Callable[[CredentialKey, TokenError], None] | None = None,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._skew_s = skew_s
        self._default_lifetime_s = default_lifetime_s
        self._failure_hold_s = failure_hold_s
        self._on_fetched = on_fetched
        self._on_failed = on_failed
        self._tokens: dict[CredentialKey, Token] = {}
        self._failures: dict[CredentialKey, tuple[float, TokenError]] = {}
        self._inflight: dict[CredentialKey, asyncio.Task[Token]] = {}
        self._tasks = TaskSet()

    def peek(self, key: CredentialKey) -> Token | None:
        """The cached token if it is still fresh; never waits."""
        token = self._tokens.get(key)
        if token is not None and self._clock() < token.renew_at:
            return token
        return None

    async def obtain(self, key: CredentialKey) -> Token:
        """A usable token: cached, or from the one shared fetch for ``key``.

        Past ``renew_at`` but before ``expires_at`` the cached token is returned at
        once while the refresh runs in the background, so a slow or down IdP never
        delays a request that still holds a valid token. Only with no valid token
        does the caller wait; it then gets the fetch's TokenError. After a failure,
        callers within ``failure_hold_s`` get the same error without a new IdP call.
        """
        token = self._tokens.get(key)
        now = self._clock()
        if token is not None and now < token.renew_at:
            return token
        task = self._inflight.get(key)
        failure = self._failures.get(key)
        if task is None and (failure is None or now >= failure[0]):
            task = self._tasks.start(self._refresh(key), name="token-fetch")
            self._inflight[key] = task
        if token is not None and now < token.expires_at:
            return token
        if task is None and failure is not None:
            raise failure[1]
        assert task is not None  # noqa: S101 - started above unless a failure is held
        return await asyncio.shield(task)

    def invalidate(self, key: CredentialKey, used: Token) -> bool:
        """Drop the cached token only if it is still ``used``; True if dropped.

        A burst of 401s for one token thus causes one refresh, not one per 401.
        """
        if self._tokens.get(key) is used:
            del self._tokens[key]
            return True
        return False

    def clear(self) -> None:
        self._tokens.clear()
        self._failures.clear()

    async def close(self) -> None:
        await self._tasks.cancel_all()

    async def _refresh(self, key: CredentialKey) -> Token:
        sent_at = self._clock()
        try:
            grant = await self._fetch(key)
        except TokenError as exc:
            self._failures[key] = (self._clock() + self._failure_hold_s, exc)
            if self._on_failed is not None:
                self._on_failed(key, exc)
            raise
        finally:
            self._inflight.pop(key, None)
        token = make_token(
            grant, sent_at=sent_at, skew_s=self._skew_s, default_lifetime_s=self._default_lifetime_s
        )
        self._tokens[key] = token
        self._failures.pop(key, None)
        if self._on_fetched is not None:
            self._on_fetched(key, token)
        return token
