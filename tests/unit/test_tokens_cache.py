"""TokenCache: single-flight fetches, compare-and-invalidate, failure hold.

The fetch is a fake with a gate the test opens; time is an injected clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from m2m_proxy.config import CredentialSpec
from m2m_proxy.errors import (
    TokenError,
    TokenRejectedError,
    TokenTimeoutError,
    TokenUnavailableError,
)
from m2m_proxy.tokens.cache import TokenCache
from m2m_proxy.tokens.model import CredentialKey, Token, TokenGrant

KEY = CredentialSpec(client="orders", scope=("read",))
OTHER = CredentialSpec(client="billing")


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeFetch:
    """Counts calls; each call waits for ``gate`` then returns or raises its outcome."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.calls: list[CredentialKey] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.outcomes: list[TokenGrant | TokenError] = []
        self.duration_s = 0.0
        self.cancelled = 0

    async def __call__(self, key: CredentialKey) -> TokenGrant:
        self.calls.append(key)
        n = len(self.calls)
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.clock.now += self.duration_s
        outcome = self.outcomes.pop(0) if self.outcomes else grant(f"tok-{n}")
        if isinstance(outcome, TokenError):
            raise outcome
        return outcome


def grant(value: str, expires_in_s: float | None = 300.0) -> TokenGrant:
    return TokenGrant(access_token=value, expires_in_s=expires_in_s)


class Recorder:
    def __init__(self) -> None:
        self.fetched: list[tuple[CredentialKey, Token]] = []
        self.failed: list[tuple[CredentialKey, TokenError]] = []

    def on_fetched(self, key: CredentialKey, token: Token) -> None:
        self.fetched.append((key, token))

    def on_failed(self, key: CredentialKey, error: TokenError) -> None:
        self.failed.append((key, error))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fetch(clock: Clock) -> FakeFetch:
    return FakeFetch(clock)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def cache(clock: Clock, fetch: FakeFetch, recorder: Recorder) -> TokenCache:
    return TokenCache(
        fetch,
        clock=clock,
        skew_s=60.0,
        default_lifetime_s=300.0,
        failure_hold_s=5.0,
        jitter=lambda: 0.0,
        on_fetched=recorder.on_fetched,
        on_failed=recorder.on_failed,
    )


def spawn(coro: Coroutine[Any, Any, Token]) -> asyncio.Task[Token]:
    """A task the test holds on to (asyncio.create_task is banned for unowned tasks)."""
    return asyncio.get_running_loop().create_task(coro)


async def settle() -> None:
    """Let every ready task run until it blocks."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_cold_cache_fetches_once_then_serves_from_the_cache(
    cache: TokenCache, fetch: FakeFetch
) -> None:
    assert cache.peek(KEY) is None
    token = await cache.obtain(KEY)
    assert token.authorization == "Bearer tok-1"
    assert cache.peek(KEY) is token
    assert await cache.obtain(KEY) is token
    assert fetch.calls == [KEY]


async def test_concurrent_cold_obtains_cause_exactly_one_fetch(
    cache: TokenCache, fetch: FakeFetch
) -> None:
    fetch.gate.clear()
    waiters = [spawn(cache.obtain(KEY)) for _ in range(50)]
    await settle()
    assert len(fetch.calls) == 1
    fetch.gate.set()
    tokens = await asyncio.gather(*waiters)
    assert len(fetch.calls) == 1
    assert all(t is tokens[0] for t in tokens)


async def test_equal_credential_specs_share_one_fetch(cache: TokenCache, fetch: FakeFetch) -> None:
    fetch.gate.clear()
    first = CredentialSpec(client="orders", scope=("a", "b"), audience="x")
    second = CredentialSpec(client="orders", scope=("a", "b"), audience="x")
    waiters = asyncio.gather(cache.obtain(first), cache.obtain(second))
    await settle()
    fetch.gate.set()
    a, b = await waiters
    assert a is b
    assert len(fetch.calls) == 1


async def test_different_credentials_fetch_independently(
    cache: TokenCache, fetch: FakeFetch
) -> None:
    a, b = await asyncio.gather(cache.obtain(KEY), cache.obtain(OTHER))
    assert a is not b
    assert sorted(k.client for k in fetch.calls) == ["billing", "orders"]
    assert cache.peek(KEY) is a
    assert cache.peek(OTHER) is b


async def test_a_cancelled_waiter_does_not_cancel_the_shared_fetch(
    cache: TokenCache, fetch: FakeFetch
) -> None:
    fetch.gate.clear()
    leaving = spawn(cache.obtain(KEY))
    staying = spawn(cache.obtain(KEY))
    await settle()
    leaving.cancel()
    await settle()
    assert leaving.cancelled()
    fetch.gate.set()
    token = await staying
    assert fetch.cancelled == 0
    assert len(fetch.calls) == 1
    assert cache.peek(KEY) is token


async def test_a_fetch_whose_only_waiter_left_still_fills_the_cache(
    cache: TokenCache, fetch: FakeFetch
) -> None:
    fetch.gate.clear()
    leaving = spawn(cache.obtain(KEY))
    await settle()
    leaving.cancel()
    fetch.gate.set()
    await settle()
    assert fetch.cancelled == 0
    token = cache.peek(KEY)
    assert token is not None
    assert await cache.obtain(KEY) is token
    assert len(fetch.calls) == 1


async def test_peek_returns_none_from_refresh_at_on(cache: TokenCache, clock: Clock) -> None:
    token = await cache.obtain(KEY)
    # renew_at (300 s - 60 s skew - 1 s) comes just before 80 % of the lifetime (240 s)
    assert token.refresh_at == 1000.0 + 239.0
    clock.now = token.refresh_at - 0.001
    assert cache.peek(KEY) is token
    clock.now = token.refresh_at
    assert cache.peek(KEY) is None
    clock.now = token.expires_at + 1
    assert cache.peek(KEY) is None


async def test_expired_token_is_refetched_once(
    cache: TokenCache, fetch: FakeFetch, clock: Clock
) -> None:
    old = await cache.obtain(KEY)
    clock.now = old.expires_at + 1
    fetch.gate.clear()
    waiters = asyncio.gather(*(cache.obtain(KEY) for _ in range(20)))
    await settle()
    fetch.gate.set()
    tokens = await waiters
    assert len(fetch.calls) == 2
    assert tokens[0] is not old
    assert tokens[0].authorization == "Bearer tok-2"
    assert all(t is tokens[0] for t in tokens)


async def test_expiry_is_anchored_at_the_time_the_fetch_started(
    cache: TokenCache, fetch: FakeFetch, clock: Clock
) -> None:
    fetch.duration_s = 7.0
    token = await cache.obtain(KEY)
    assert clock.now == 1007.0
    assert token.obtained_at == 1000.0
    assert token.expires_at == 1300.0


async def test_missing_expires_in_uses_the_default_lifetime(
    cache: TokenCache, fetch: FakeFetch
) -> None:
    fetch.outcomes = [grant("tok", expires_in_s=None)]
    token = await cache.obtain(KEY)
    assert token.expires_at - token.obtained_at == 300.0


async def test_invalidate_drops_the_token_it_was_given(cache: TokenCache, fetch: FakeFetch) -> None:
    token = await cache.obtain(KEY)
    assert cache.invalidate(KEY, token) is True
    assert cache.peek(KEY) is None
    fresh = await cache.obtain(KEY)
    assert fresh is not token
    assert len(fetch.calls) == 2


async def test_invalidate_with_a_stale_token_keeps_the_newer_one(cache: TokenCache) -> None:
    old = await cache.obtain(KEY)
    assert cache.invalidate(KEY, old) is True
    new = await cache.obtain(KEY)
    assert cache.invalidate(KEY, old) is False
    assert cache.peek(KEY) is new


async def test_invalidate_of_an_unknown_key_is_false(cache: TokenCache) -> None:
    token = await cache.obtain(KEY)
    assert cache.invalidate(OTHER, token) is False
    assert cache.peek(KEY) is token


async def test_a_burst_of_401s_for_one_token_causes_one_refresh(
    cache: TokenCache, fetch: FakeFetch
) -> None:
    used = await cache.obtain(KEY)
    dropped = [cache.invalidate(KEY, used) for _ in range(20)]
    assert dropped.count(True) == 1
    fetch.gate.clear()
    waiters = asyncio.gather(*(cache.obtain(KEY) for _ in range(20)))
    await settle()
    fetch.gate.set()
    tokens = await waiters
    assert len(fetch.calls) == 2
    assert {id(t) for t in tokens} == {id(tokens[0])}


async def test_a_failed_fetch_reaches_every_waiter_and_calls_on_failed(
    cache: TokenCache, fetch: FakeFetch, recorder: Recorder
) -> None:
    error = TokenUnavailableError("idp down")
    fetch.outcomes = [error]
    fetch.gate.clear()
    waiters = asyncio.gather(*(cache.obtain(KEY) for _ in range(5)), return_exceptions=True)
    await settle()
    fetch.gate.set()
    results = await waiters
    assert all(isinstance(r, TokenUnavailableError) and r.detail == "idp down" for r in results)
    assert {r.retry_after_s for r in results if isinstance(r, TokenUnavailableError)} == {5.0}
    assert len(fetch.calls) == 1
    assert recorder.failed == [(KEY, error)]
    assert recorder.fetched == []


async def test_callers_within_the_failure_hold_fail_at_once_without_a_fetch(
    cache: TokenCache, fetch: FakeFetch, clock: Clock
) -> None:
    fetch.outcomes = [TokenTimeoutError("slow idp")]
    with pytest.raises(TokenTimeoutError):
        await cache.obtain(KEY)
    clock.now += 4.9
    fetch.gate.clear()  # a new fetch would hang: failing at once proves there is none
    with pytest.raises(TokenTimeoutError) as info:
        await asyncio.wait_for(cache.obtain(KEY), timeout=1.0)
    assert info.value.detail == "slow idp"
    assert len(fetch.calls) == 1


async def test_after_the_failure_hold_a_new_fetch_happens(
    cache: TokenCache, fetch: FakeFetch, clock: Clock, recorder: Recorder
) -> None:
    fetch.outcomes = [TokenUnavailableError("idp down")]
    with pytest.raises(TokenUnavailableError):
        await cache.obtain(KEY)
    clock.now += 5.0
    token = await cache.obtain(KEY)
    assert len(fetch.calls) == 2
    assert recorder.fetched == [(KEY, token)]


async def test_a_failure_hold_is_per_credential(cache: TokenCache, fetch: FakeFetch) -> None:
    fetch.outcomes = [TokenUnavailableError("idp down")]
    with pytest.raises(TokenUnavailableError):
        await cache.obtain(KEY)
    assert (await cache.obtain(OTHER)).authorization == "Bearer tok-2"


async def test_a_success_clears_the_failure_hold(
    cache: TokenCache, fetch: FakeFetch, clock: Clock
) -> None:
    fetch.outcomes = [TokenUnavailableError("idp down")]
    with pytest.raises(TokenUnavailableError):
        await cache.obtain(KEY)
    clock.now += 5.0
    token = await cache.obtain(KEY)
    cache.invalidate(KEY, token)
    assert (await cache.obtain(KEY)) is not token
    assert len(fetch.calls) == 3


async def test_on_fetched_is_called_once_per_fetch_with_the_key_and_token(
    cache: TokenCache, recorder: Recorder
) -> None:
    token = await cache.obtain(KEY)
    await cache.obtain(KEY)
    assert recorder.fetched == [(KEY, token)]


async def test_a_valid_token_is_served_while_the_idp_is_down_until_it_expires(
    cache: TokenCache, fetch: FakeFetch, clock: Clock
) -> None:
    # DESIGN.md §4: past renew_at the token is refreshed, but if the IdP is down the
    # still-valid token keeps being served until it really expires.
    token = await cache.obtain(KEY)
    fetch.outcomes = [TokenUnavailableError("idp down")] * 3
    clock.now = token.renew_at + 1
    assert await cache.obtain(KEY) is token
    clock.now = token.expires_at
    with pytest.raises(TokenUnavailableError):
        await cache.obtain(KEY)


async def test_close_cancels_an_in_flight_fetch(cache: TokenCache, fetch: FakeFetch) -> None:
    fetch.gate.clear()
    waiter = spawn(cache.obtain(KEY))
    await settle()
    await cache.close()
    assert fetch.cancelled == 1
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_past_refresh_at_the_token_is_served_while_one_background_fetch_replaces_it(
    cache: TokenCache, fetch: FakeFetch, clock: Clock
) -> None:
    old = await cache.obtain(KEY)
    clock.now = old.refresh_at + 1
    fetch.gate.clear()  # the refresh hangs: the requests must not wait for it
    served = await asyncio.wait_for(
        asyncio.gather(*(cache.obtain(KEY) for _ in range(20))), timeout=1.0
    )
    assert all(token is old for token in served)
    assert len(fetch.calls) == 2  # the first fetch and exactly one refresh
    fetch.gate.set()
    await settle()
    new = cache.peek(KEY)
    assert new is not None and new is not old
    assert new.obtained_at == old.refresh_at + 1


async def test_failures_in_a_row_back_off_exponentially_up_to_the_cap(
    cache: TokenCache, fetch: FakeFetch, clock: Clock
) -> None:
    holds = []
    for _ in range(5):
        fetch.outcomes = [TokenUnavailableError("idp down")]
        with pytest.raises(TokenUnavailableError) as info:
            await cache.obtain(KEY)
        assert info.value.retry_after_s is not None
        holds.append(info.value.retry_after_s)
        clock.now += info.value.retry_after_s
    assert holds == [5.0, 10.0, 20.0, 30.0, 30.0]
    assert len(fetch.calls) == 5
    await cache.obtain(KEY)  # a success resets the backoff
    fetch.outcomes = [TokenUnavailableError("idp down")]
    cache.invalidate(KEY, cache.peek(KEY))  # type: ignore[arg-type]
    with pytest.raises(TokenUnavailableError) as info:
        await cache.obtain(KEY)
    assert info.value.retry_after_s == 5.0


async def test_an_idp_retry_after_and_a_rejection_hold_longer(
    cache: TokenCache, fetch: FakeFetch, clock: Clock
) -> None:
    fetch.outcomes = [TokenUnavailableError("busy", retry_after_s=60.0)]
    with pytest.raises(TokenUnavailableError) as info:
        await cache.obtain(KEY)
    assert info.value.retry_after_s == 60.0
    fetch.outcomes = [TokenRejectedError("bad client", oauth_error="invalid_client")]
    with pytest.raises(TokenRejectedError) as rejected:
        await cache.obtain(OTHER)
    assert rejected.value.retry_after_s == 30.0
    clock.now += 29.0
    with pytest.raises(TokenRejectedError):
        await cache.obtain(OTHER)
    assert len(fetch.calls) == 2  # held: no new request to the IdP


# --- credentials that change -------------------------------------------------------


async def test_forget_client_drops_only_that_clients_tokens(
    cache: TokenCache, fetch: FakeFetch
) -> None:
    await cache.obtain(KEY)
    other = await cache.obtain(OTHER)
    assert cache.forget_client("orders", "fp-2") == 1
    assert cache.current(KEY) is None
    assert cache.current(OTHER) is other
    assert cache.forget_client("orders", "fp-2") == 0


async def test_forget_client_ends_a_held_failure(cache: TokenCache, fetch: FakeFetch) -> None:
    fetch.outcomes = [
        TokenRejectedError("invalid_client", oauth_error="invalid_client"),
        TokenGrant("tok-2", 300.0, fingerprint="fp-new"),
    ]
    with pytest.raises(TokenRejectedError):
        await cache.obtain(KEY)
    with pytest.raises(TokenRejectedError):
        await cache.obtain(KEY)  # held: no second fetch
    assert len(fetch.calls) == 1
    cache.forget_client("orders", "fp-new")  # the secret was rotated: try again at once
    token = await cache.obtain(KEY)
    assert token.authorization == "Bearer tok-2"


async def test_a_fetch_made_with_the_old_credentials_is_not_cached(
    cache: TokenCache, fetch: FakeFetch
) -> None:
    fetch.gate.clear()
    fetch.outcomes = [
        TokenGrant("minted-with-old", 300.0, fingerprint="fp-old"),
        TokenGrant("minted-with-new", 300.0, fingerprint="fp-new"),
    ]
    waiter = spawn(cache.obtain(KEY))
    await settle()
    cache.forget_client("orders", "fp-new")  # rotated while the fetch was under way
    fetch.gate.set()
    token = await waiter
    assert token.authorization == "Bearer minted-with-new"
    assert token.fingerprint == "fp-new"
    assert len(fetch.calls) == 2
    assert cache.current(KEY) is token
