"""Token values and their expiry math. Pure: times are plain floats from a clock.

A token is served until ``renew_at = expires_at - min(skew, lifetime / 2)``, with
``expires_at`` anchored at the moment the token request was *sent*, so time spent
waiting for the IdP never makes us hold a token longer than the IdP meant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from m2m_proxy.config import CredentialSpec

CredentialKey = CredentialSpec
"""Tokens are cached per credential (client, scope, audience, resource, params)."""

MAX_LIFETIME_S = 24 * 3600.0
"""Longer ``expires_in`` values are clamped: no sane M2M token lives longer."""


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """A validated token endpoint answer (RFC 6749 §5.1)."""

    access_token: str = field(repr=False)
    expires_in_s: float | None
    scope: str | None = None


@dataclass(frozen=True, slots=True, eq=False)
class Token:
    """A cached token. Identity matters: ``invalidate`` compares with ``is``."""

    authorization: str = field(repr=False)
    obtained_at: float
    expires_at: float
    renew_at: float

    @property
    def lifetime_s(self) -> float:
        return self.expires_at - self.obtained_at

    def __repr__(self) -> str:
        return f"Token(lifetime_s={self.lifetime_s:.0f}, authorization='***')"


def make_token(
    grant: TokenGrant, *, sent_at: float, skew_s: float, default_lifetime_s: float
) -> Token:
    """Build the cached token for ``grant`` requested at ``sent_at``."""
    lifetime = grant.expires_in_s if grant.expires_in_s is not None else default_lifetime_s
    lifetime = min(lifetime, MAX_LIFETIME_S)
    expires_at = sent_at + lifetime
    return Token(
        authorization=f"Bearer {grant.access_token}",
        obtained_at=sent_at,
        expires_at=expires_at,
        renew_at=expires_at - min(skew_s, lifetime / 2),
    )
