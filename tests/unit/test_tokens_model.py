"""make_token: expiry anchored at send time, skew (+1 s granularity) capped at half the lifetime."""

from __future__ import annotations

import pytest

from m2m_proxy.tokens.model import MAX_LIFETIME_S, Token, TokenGrant, make_token

SENTINEL = "tok-sentinel-77aa"


def token(expires_in_s: float | None, *, sent_at: float = 1000.0, skew_s: float = 60.0) -> Token:
    return make_token(
        TokenGrant(access_token=SENTINEL, expires_in_s=expires_in_s),
        sent_at=sent_at,
        skew_s=skew_s,
        default_lifetime_s=300.0,
    )


def test_expiry_is_anchored_at_the_moment_the_request_was_sent() -> None:
    t = token(3600.0, sent_at=1000.0)
    assert t.obtained_at == 1000.0
    assert t.expires_at == 4600.0
    assert t.lifetime_s == 3600.0


def test_renewal_is_skew_plus_one_second_before_expiry_for_long_lifetimes() -> None:
    # expires_in and a JWT's exp count whole seconds: the upstream may see the token
    # expire up to 1 s before sent_at + expires_in
    assert token(3600.0, sent_at=1000.0, skew_s=60.0).renew_at == 4539.0


def test_skew_is_capped_at_half_the_lifetime_for_short_tokens() -> None:
    t = token(30.0, sent_at=1000.0, skew_s=60.0)
    assert t.expires_at == 1030.0
    assert t.renew_at == 1015.0


def test_skew_equal_to_half_the_lifetime_is_the_boundary() -> None:
    assert token(122.0, sent_at=0.0, skew_s=60.0).renew_at == 61.0
    assert token(123.0, sent_at=0.0, skew_s=60.0).renew_at == 62.0


def test_zero_skew_still_renews_one_second_before_expiry() -> None:
    t = token(100.0, sent_at=0.0, skew_s=0.0)
    assert t.expires_at == 100.0
    assert t.renew_at == 99.0


def test_short_tokens_with_a_small_skew_renew_before_the_last_whole_second() -> None:
    t = token(5.0, sent_at=0.0, skew_s=0.5)
    assert t.renew_at == t.refresh_at == 3.5  # 0.8 x 5 s = 4 s would come after renew_at


def test_missing_expires_in_uses_the_default_lifetime() -> None:
    t = token(None, sent_at=1000.0, skew_s=60.0)
    assert t.expires_at == 1300.0
    assert t.renew_at == 1239.0


def test_very_long_lifetimes_are_clamped() -> None:
    t = token(10 * MAX_LIFETIME_S, sent_at=0.0, skew_s=60.0)
    assert MAX_LIFETIME_S == 86400.0
    assert t.expires_at == MAX_LIFETIME_S
    assert t.renew_at == MAX_LIFETIME_S - 61.0


def test_authorization_is_the_bearer_header_value() -> None:
    assert token(60.0).authorization == f"Bearer {SENTINEL}"


def test_repr_of_a_token_and_a_grant_hides_the_token() -> None:
    t = token(3600.0)
    grant = TokenGrant(access_token=SENTINEL, expires_in_s=3600.0, scope="read")
    assert SENTINEL not in repr(t)
    assert SENTINEL not in str(t)
    assert repr(t) == "Token(lifetime_s=3600, authorization='***')"
    assert SENTINEL not in repr(grant)


def test_tokens_compare_by_identity() -> None:
    first, second = token(60.0), token(60.0)
    assert first == first  # noqa: PLR0124 - identity is the contract here
    assert first != second


@pytest.mark.parametrize("sent_at", [0.0, 12345.678])
def test_renew_at_is_never_after_expiry_or_before_obtained(sent_at: float) -> None:
    for lifetime in (0.5, 1.0, 59.0, 3600.0):
        t = token(lifetime, sent_at=sent_at)
        assert t.obtained_at < t.renew_at <= t.expires_at


@pytest.mark.parametrize(("jitter", "fraction"), [(-1.0, 0.72), (0.0, 0.8), (1.0, 0.88)])
def test_refresh_at_is_80_percent_of_the_lifetime_jittered_by_10_percent(
    jitter: float, fraction: float
) -> None:
    grant = TokenGrant(access_token="t", expires_in_s=3600.0)
    token = make_token(grant, sent_at=100.0, skew_s=60.0, default_lifetime_s=300.0, jitter=jitter)
    assert token.refresh_at == pytest.approx(100.0 + fraction * 3600.0)


def test_refresh_at_is_never_later_than_renew_at() -> None:
    grant = TokenGrant(access_token="t", expires_in_s=100.0)  # skew 60 > 20 % of 100
    token = make_token(grant, sent_at=0.0, skew_s=60.0, default_lifetime_s=300.0, jitter=1.0)
    assert token.renew_at == 50.0  # min(skew, lifetime / 2)
    assert token.refresh_at == 50.0


def test_an_absurd_lifetime_is_clamped_and_says_so() -> None:
    grant = TokenGrant(access_token="t", expires_in_s=1e12)
    token = make_token(grant, sent_at=0.0, skew_s=60.0, default_lifetime_s=300.0)
    assert token.lifetime_s == MAX_LIFETIME_S
    assert token.clamped_from_s == 1e12
    normal = make_token(
        TokenGrant(access_token="t", expires_in_s=3600.0),
        sent_at=0.0,
        skew_s=60.0,
        default_lifetime_s=300.0,
    )
    assert normal.clamped_from_s is None
