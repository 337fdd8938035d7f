"""Token endpoint answers → :class:`TokenGrant` or a classified error. Pure.

RFC 6749 §5.1 (success) and §5.2 (error). Nothing from the IdP's body is ever put
into an error message except the registered ``error`` code, so a misbehaving IdP
that echoes secrets cannot leak them through us.
"""

from __future__ import annotations

import base64
import json
import math
import re

from m2m_proxy.errors import TokenRejectedError, TokenResponseInvalidError
from m2m_proxy.tokens.model import TokenGrant

MAX_BODY_BYTES = 64 * 1024

# RFC 6749 §5.2 plus codes IdPs commonly add; anything else is reported as "other".
KNOWN_OAUTH_ERRORS = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "invalid_target",
        "access_denied",
        "server_error",
        "temporarily_unavailable",
        "invalid_resource",
        "unauthorized",
    }
)

# RFC 6750 b64token plus the characters real IdPs put in opaque tokens; never CR/LF.
_HEADER_SAFE_TOKEN = re.compile(r"[\x21-\x7e]+")


def parse_success(body: bytes, *, now: float) -> TokenGrant:
    """Validate a 200 answer; raise TokenResponseInvalidError saying what was wrong.

    Without ``expires_in``, a JWT access token's ``exp`` (against the wall clock
    ``now``) gives the lifetime; the signature is not checked, the API does that.
    """
    data = _json_object(body)
    token = data.get("access_token")
    if not isinstance(token, str) or not token:
        raise TokenResponseInvalidError("the token response has no access_token string")
    if len(token) > 16 * 1024 or not _HEADER_SAFE_TOKEN.fullmatch(token):
        raise TokenResponseInvalidError(
            "the access_token is not a legal header value (control characters, spaces "
            "or over 16 KiB)"
        )
    token_type = data.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise TokenResponseInvalidError(
            "the token_type is not 'Bearer'; only bearer tokens are supported"
        )
    scope = data.get("scope")
    expires_in = _expires_in(data.get("expires_in"))
    if expires_in is None:
        expires_in = _jwt_lifetime(token, now)
    return TokenGrant(
        access_token=token,
        expires_in_s=expires_in,
        scope=scope if isinstance(scope, str) else None,
    )


def _expires_in(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value)  # some IdPs send a JSON string; RFC 6749 says number
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TokenResponseInvalidError("expires_in is not a number")
    if value <= 0:
        raise TokenResponseInvalidError("expires_in is not positive")
    return float(value)


def jwt_claims(token: str) -> dict[str, object] | None:
    """The payload of a JWS compact token, unverified, or None if it is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, UnicodeDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


def _jwt_lifetime(token: str, now: float) -> float | None:
    """Seconds until the ``exp`` claim of a JWS compact token, or None if not a JWT."""
    payload = jwt_claims(token)
    exp = payload.get("exp") if payload is not None else None
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        return None
    if exp <= now:
        raise TokenResponseInvalidError("the access token's exp claim is already in the past")
    return float(exp - now)


def rejection(status: int, body: bytes) -> TokenRejectedError:
    """A 4xx answer: the IdP refused this client's request (a configuration error)."""
    try:
        error = _json_object(body).get("error")
    except TokenResponseInvalidError:
        error = None
    code = error if isinstance(error, str) and error in KNOWN_OAUTH_ERRORS else "other"
    return TokenRejectedError(
        f"the identity provider refused the token request (HTTP {status}, error={code}); "
        "check the client's credentials, scope and audience",
        oauth_error=code,
    )


def _json_object(body: bytes) -> dict[str, object]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise TokenResponseInvalidError("the token response is not JSON") from None
    if not isinstance(data, dict):
        raise TokenResponseInvalidError("the token response is not a JSON object")
    return data
