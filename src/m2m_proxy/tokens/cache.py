"""TokenCache: cached tokens per credential, one fetch in flight per credential.

The hot path is :meth:`TokenCache.peek`: a dict lookup and a clock compare, no
await. A token is fresh until ``renew_at``; from then until ``expires_at`` it is
still served while one background fetch replaces it. :meth:`obtain` is the slow
path: every caller for the same credential awaits the same shielded fetch task,
so a burst of N cold requests or N 401s costs one IdP call, and a caller that goes
away never cancels it for the others.

When a client's credentials change (:meth:`TokenCache.forget_client`, fed by
:mod:`m2m_proxy.tokens.material`), its tokens are dropped, and a fetch that was
already under way with the old credentials asks again instead of caching its token.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from m2m_proxy.errors import TokenError, TokenRejectedError
from m2m_proxy.tasks import TaskSet
from m2m_proxy.tokens.model import CredentialKey, Token, TokenGrant, make_token

Fetch = Callable[[CredentialKey], Awaitable[TokenGrant]]
Clock = Callable[[], float]

REJECTION_HOLD_S = 30.0
"""An IdP rejection (invalid_client, invalid_scope, ...) is a configuration error:
asking again at once would get the same answer."""


def _uniform_jitter() -> float:
    return random.uniform(-1.0, 1.0)  # noqa: S311 - spreading timers, not cryptography


@dataclass(frozen=True, slots=True)
class _Failure:
    until: float
    error: TokenError
    attempts: int


@dataclass(slots=True)
class _History:
    fetches: int = 0
    last_error: str | None = None
    last_error_at: float | None = None


@dataclass(frozen=True, slots=True)
class CredentialState:
    """What the cache knows about one credential, for ``/tokens``; never the token."""

    key: CredentialKey
    token: Token | None
    fetches: int
    last_error: str | None
    """The error code of the last failed fetch (even if a later one succeeded)."""
    last_error_at: float | None
    held_until: float | None
    """While a failure is held: when the next fetch may start."""


class TokenCache:
    def __init__(
        self,
        fetch: Fetch,
        *,
        clock: Clock,
        skew_s: float,
        default_lifetime_s: float,
        failure_hold_s: float,
        failure_hold_max_s: float = 30.0,
        jitter: Callable[[], float] = _uniform_jitter,
        on_fetched: Callable[[CredentialKey, Token], None] | None = None,
        on_failed: Callable[[CredentialKey, TokenError], None] | None = None,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._skew_s = skew_s
        self._default_lifetime_s = default_lifetime_s
        self._failure_hold_s = failure_hold_s
        self._failure_hold_max_s = max(failure_hold_s, failure_hold_max_s)
        self._jitter = jitter
        self._on_fetched = on_fetched
        self._on_failed = on_failed
        self._tokens: dict[CredentialKey, Token] = {}
        self._failures: dict[CredentialKey, _Failure] = {}
        self._inflight: dict[CredentialKey, asyncio.Task[Token]] = {}
        self._fingerprints: dict[str, str] = {}
        self._history: dict[CredentialKey, _History] = {}
        self._tasks = TaskSet()

    def peek(self, key: CredentialKey) -> Token | None:
        """The cached token if no refresh is due yet; never waits."""
        token = self._tokens.get(key)
        if token is not None and self._clock() < token.refresh_at:
            return token
        return None

    def current(self, key: CredentialKey) -> Token | None:
        """A still-valid token, or None; never waits.

        Past ``refresh_at`` (but before ``expires_at``) it starts one background
        refresh and returns the cached token, so requests never wait on the IdP
        while a valid token exists, and a slow or down IdP is invisible to them.
        """
        token = self._tokens.get(key)
        if token is None:
            return None
        now = self._clock()
        if now < token.refresh_at:
            return token
        if now < token.expires_at:
            self._start_fetch(key, now)
            return token
        return None

    async def obtain(self, key: CredentialKey) -> Token:
        """A usable token: :meth:`current`, or the result of the one shared fetch.

        Only with no valid token does the caller wait; it then gets the fetch's
        TokenError. After a failure, no new fetch starts until the hold ends
        (exponential backoff with jitter, honouring the IdP's Retry-After); callers
        get the error at once, with a Retry-After for the rest of the hold.
        """
        token = self.current(key)
        if token is not None:
            return token
        now = self._clock()
        task = self._start_fetch(key, now)
        if task is None:
            failure = self._failures[key]
            raise failure.error.with_retry_after(failure.until - now)
        try:
            return await asyncio.shield(task)
        except TokenError as exc:
            held = self._failures.get(key)
            if held is None or held.error is not exc:
                raise
            raise exc.with_retry_after(held.until - self._clock()) from None

    def _start_fetch(self, key: CredentialKey, now: float) -> asyncio.Task[Token] | None:
        """The fetch in flight for ``key``, a new one, or None while a failure is held."""
        task = self._inflight.get(key)
        if task is not None:
            return task
        failure = self._failures.get(key)
        if failure is not None and now < failure.until:
            return None
        task = self._tasks.start(self._refresh(key), name="token-fetch")
        self._inflight[key] = task
        return task

    def invalidate(self, key: CredentialKey, used: Token) -> bool:
        """Drop the cached token only if it is still ``used``; True if dropped.

        A burst of 401s for one token thus causes one refresh, not one per 401.
        """
        if self._tokens.get(key) is used:
            del self._tokens[key]
            return True
        return False

    def forget_client(self, client: str, fingerprint: str) -> int:
        """The client's credentials are now ``fingerprint``: drop its tokens and held
        failures (the new credentials deserve a fresh try); returns tokens dropped."""
        self._fingerprints[client] = fingerprint
        return self.flush(client)

    def flush(self, client: str | None = None) -> int:
        """Drop the cached tokens (of ``client``, or all) and held failures; returns
        the number of tokens dropped. The next request fetches anew."""
        keys = [k for k in self._tokens if client is None or k.client == client]
        for key in keys:
            del self._tokens[key]
        for key in [k for k in self._failures if client is None or k.client == client]:
            del self._failures[key]
        return len(keys)

    def states(self) -> list[CredentialState]:
        """Every credential the cache has seen, for ``/tokens``."""
        now = self._clock()
        keys = dict.fromkeys([*self._history, *self._tokens])
        out = []
        for key in keys:
            history = self._history.get(key, _History())
            failure = self._failures.get(key)
            out.append(
                CredentialState(
                    key=key,
                    token=self._tokens.get(key),
                    fetches=history.fetches,
                    last_error=history.last_error,
                    last_error_at=history.last_error_at,
                    held_until=failure.until
                    if failure is not None and failure.until > now
                    else None,
                )
            )
        return out

    def expiries(self) -> dict[str, float]:
        """Per client, seconds until its soonest-expiring cached token expires."""
        now = self._clock()
        out: dict[str, float] = {}
        for key, token in self._tokens.items():
            left = token.expires_at - now
            if key.client not in out or left < out[key.client]:
                out[key.client] = left
        return out

    async def close(self) -> None:
        await self._tasks.cancel_all()

    async def _refresh(self, key: CredentialKey) -> Token:
        history = self._history.get(key)
        if history is None:
            history = self._history[key] = _History()
        try:
            for _ in range(2):  # a second try only if the credentials changed meanwhile
                sent_at = self._clock()
                history.fetches += 1
                grant = await self._fetch(key)
                if self._fingerprints.get(key.client, grant.fingerprint) == grant.fingerprint:
                    break
        except TokenError as exc:
            previous = self._failures.get(key)
            attempts = previous.attempts + 1 if previous is not None else 1
            hold = self._hold_for(exc, attempts)
            history.last_error, history.last_error_at = exc.code, self._clock()
            self._failures[key] = _Failure(self._clock() + hold, exc, attempts)
            if self._on_failed is not None:
                self._on_failed(key, exc)
            raise
        finally:
            self._inflight.pop(key, None)
        token = make_token(
            grant,
            sent_at=sent_at,
            skew_s=self._skew_s,
            default_lifetime_s=self._default_lifetime_s,
            jitter=self._jitter(),
        )
        self._tokens[key] = token
        self._failures.pop(key, None)
        if self._on_fetched is not None:
            self._on_fetched(key, token)
        return token

    def _hold_for(self, exc: TokenError, attempts: int) -> float:
        """Backoff after the ``attempts``-th failure in a row: base x 2^(n-1), capped,
        ±20 % jitter; at least the IdP's Retry-After; a rejection holds 30 s."""
        hold = min(self._failure_hold_s * 2.0 ** (attempts - 1), self._failure_hold_max_s)
        hold *= 1 + 0.2 * self._jitter()
        if isinstance(exc, TokenRejectedError):
            hold = max(hold, REJECTION_HOLD_S)
        if exc.retry_after_s is not None:
            hold = max(hold, min(exc.retry_after_s, 300.0))
        return hold
