"""Token values and their expiry math. Pure: times are plain floats from a clock.

Three moments in a token's life, all anchored at the moment its request was *sent*
(so time spent waiting for the IdP never makes us hold a token longer than meant):

- ``refresh_at``: about 80 % of the lifetime (±10 % jitter, so that many proxies or
  credentials do not refresh in lockstep), never later than ``renew_at``. From here
  the next request starts a background refresh and keeps using this token.
- ``renew_at = expires_at - min(skew + 1 s, lifetime / 2)``: the latest refresh point.
  The extra second is the granularity of ``expires_in`` and of a JWT's ``exp`` (whole
  seconds): the upstream may see the token expire up to 1 s before ``sent_at + lifetime``.
- ``expires_at``: the token is served until here if the IdP cannot replace it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from m2m_proxy.config import CredentialSpec

CredentialKey = CredentialSpec
"""Tokens are cached per credential (client, scope, audience, resource, params)."""

REFRESH_FRACTION = 0.8
REFRESH_JITTER = 0.1
EXPIRY_GRANULARITY_S = 1.0
"""``expires_in`` and JWT ``exp`` count whole seconds; renewal leaves this much spare."""

MAX_LIFETIME_S = 24 * 3600.0
"""Longer ``expires_in`` values are clamped: no sane M2M token lives longer."""


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """A validated token endpoint answer (RFC 6749 §5.1)."""

    access_token: str = field(repr=False)
    expires_in_s: float | None
    scope: str | None = None
    fingerprint: str = ""
    """Of the client material that obtained it (see tokens.material)."""


@dataclass(frozen=True, slots=True, eq=False)
class Token:
    """A cached token. Identity matters: ``invalidate`` compares with ``is``."""

    authorization: str = field(repr=False)
    obtained_at: float
    expires_at: float
    renew_at: float
    refresh_at: float
    clamped_from_s: float | None = None
    """The IdP's lifetime when it was longer than MAX_LIFETIME_S and cut down."""
    fingerprint: str = ""
    """Of the client material that obtained it (see tokens.material)."""

    @property
    def lifetime_s(self) -> float:
        return self.expires_at - self.obtained_at

    def __repr__(self) -> str:
        return f"Token(lifetime_s={self.lifetime_s:.0f}, authorization='***')"


def make_token(
    grant: TokenGrant,
    *,
    sent_at: float,
    skew_s: float,
    default_lifetime_s: float,
    jitter: float = 0.0,
) -> Token:
    """Build the cached token for ``grant`` requested at ``sent_at``.

    ``jitter`` in [-1, 1] moves ``refresh_at`` by up to ±10 % of its offset.
    """
    asked = grant.expires_in_s if grant.expires_in_s is not None else default_lifetime_s
    lifetime = min(asked, MAX_LIFETIME_S)
    expires_at = sent_at + lifetime
    renew_at = expires_at - min(skew_s + EXPIRY_GRANULARITY_S, lifetime / 2)
    ahead = lifetime * REFRESH_FRACTION * (1 + REFRESH_JITTER * max(-1.0, min(1.0, jitter)))
    return Token(
        authorization=f"Bearer {grant.access_token}",
        obtained_at=sent_at,
        expires_at=expires_at,
        renew_at=renew_at,
        refresh_at=min(renew_at, sent_at + ahead),
        clamped_from_s=asked if asked > MAX_LIFETIME_S else None,
        fingerprint=grant.fingerprint,
    )
