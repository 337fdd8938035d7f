"""Token endpoint answers: success validation and §5.2 rejections that leak nothing."""

from __future__ import annotations

import base64
import json

import pytest

from m2m_proxy.errors import TokenRejectedError, TokenResponseInvalidError
from m2m_proxy.tokens.model import TokenGrant
from m2m_proxy.tokens.response import MAX_BODY_BYTES, rejection
from m2m_proxy.tokens.response import parse_success as parse_at

NOW = 1_800_000_000.0


def parse_success(raw: bytes) -> TokenGrant:
    return parse_at(raw, now=NOW)


def jwt(claims: dict[str, object]) -> str:
    def part(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'typ': 'at+jwt'})}.{part(claims)}.c2ln"


def body(**fields: object) -> bytes:
    return json.dumps(
        {"access_token": "abc.DEF-123_~+/=", "token_type": "Bearer", **fields}
    ).encode()


def invalid(raw: bytes) -> str:
    with pytest.raises(TokenResponseInvalidError) as info:
        parse_success(raw)
    assert info.value.code == "token_response_invalid"
    return info.value.detail


def test_a_valid_answer_gives_the_grant() -> None:
    grant = parse_success(body(expires_in=3600, scope="read write"))
    assert grant.access_token == "abc.DEF-123_~+/="
    assert grant.expires_in_s == 3600.0
    assert grant.scope == "read write"


@pytest.mark.parametrize("token_type", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_token_type_bearer_is_case_insensitive(token_type: str) -> None:
    assert parse_success(body(token_type=token_type)).access_token == "abc.DEF-123_~+/="


@pytest.mark.parametrize("token_type", ["mac", "DPoP", "", None, 1])
def test_other_token_types_are_refused(token_type: object) -> None:
    assert invalid(body(token_type=token_type)) == (
        "the token_type is not 'Bearer'; only bearer tokens are supported"
    )


def test_missing_token_type_is_refused() -> None:
    assert "token_type" in invalid(json.dumps({"access_token": "abc"}).encode())


@pytest.mark.parametrize("token", [None, "", 42, ["a"]])
def test_missing_or_non_string_access_token_is_refused(token: object) -> None:
    assert invalid(body(access_token=token)) == "the token response has no access_token string"


@pytest.mark.parametrize(
    "token",
    ["abc\r\nX-Injected: 1", "abc\n", "abc\r", "\nabc", "ab c", "ab\tc", "ab\x00c", "abcé"],
    ids=["crlf", "trailing-lf", "trailing-cr", "leading-lf", "space", "tab", "nul", "non-ascii"],
)
def test_access_token_that_is_not_a_legal_header_value_is_refused(token: str) -> None:
    assert invalid(body(access_token=token)).startswith(
        "the access_token is not a legal header value"
    )


def test_access_token_over_16_kib_is_refused() -> None:
    assert invalid(body(access_token="a" * (16 * 1024 + 1))).startswith(
        "the access_token is not a legal header value"
    )
    assert parse_success(body(access_token="a" * 16 * 1024)).access_token == "a" * 16 * 1024


@pytest.mark.parametrize(
    "raw", [b"", b"<html>502</html>", b"\xff\xfe\x00", b"{'single': 'quotes'}"]
)
def test_non_json_is_refused(raw: bytes) -> None:
    assert invalid(raw) == "the token response is not JSON"


@pytest.mark.parametrize("raw", [b"[]", b'"token"', b"null", b"3600"])
def test_json_that_is_not_an_object_is_refused(raw: bytes) -> None:
    assert invalid(raw) == "the token response is not a JSON object"


@pytest.mark.parametrize(
    ("expires_in", "seconds"),
    [(3600, 3600.0), (3600.5, 3600.5), ("3600", 3600.0), (" 60 ", 60.0), (None, None)],
)
def test_expires_in_accepts_numbers_and_digit_strings(
    expires_in: object, seconds: float | None
) -> None:
    raw = body() if expires_in is None else body(expires_in=expires_in)
    assert parse_success(raw).expires_in_s == seconds


@pytest.mark.parametrize(
    "expires_in",
    ["abc", "-5", "1e3", "", "²", True, False, [60], {}],
    ids=[
        "text",
        "negative-string",
        "exponent-string",
        "empty",
        "non-ascii-digit",
        "true",
        "false",
        "list",
        "object",
    ],
)
def test_expires_in_that_is_not_a_number_is_refused(expires_in: object) -> None:
    assert invalid(body(expires_in=expires_in)) == "expires_in is not a number"


@pytest.mark.parametrize("raw_value", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_expires_in_that_is_not_finite_is_refused(raw_value: str) -> None:
    raw = (
        b'{"access_token": "a", "token_type": "Bearer", "expires_in": ' + raw_value.encode() + b"}"
    )
    assert invalid(raw) == "expires_in is not a number"


@pytest.mark.parametrize("expires_in", [0, -1, -3600.5, "0"])
def test_expires_in_that_is_not_positive_is_refused(expires_in: object) -> None:
    assert invalid(body(expires_in=expires_in)) == "expires_in is not positive"


def test_non_string_scope_is_ignored() -> None:
    assert parse_success(body(scope=["read"])).scope is None


def test_rejection_keeps_a_known_error_code_and_nothing_else_from_the_body() -> None:
    raw = json.dumps(
        {
            "error": "invalid_client",
            "error_description": "client secret 'hunter2-sentinel' is wrong",
            "error_uri": "https://idp.example.com/help",
        }
    ).encode()
    error = rejection(401, raw)
    assert isinstance(error, TokenRejectedError)
    assert error.oauth_error == "invalid_client"
    assert error.detail == (
        "the identity provider refused the token request (HTTP 401, error=invalid_client); "
        "check the client's credentials, scope and audience"
    )
    assert error.status == 502
    assert error.code == "token_rejected"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"error": "hunter2-sentinel"}',
        b'{"error": "invalid_client hunter2-sentinel"}',
        b'{"error": 400, "message": "hunter2-sentinel"}',
        b"<html>hunter2-sentinel</html>",
        b'["hunter2-sentinel"]',
        b"",
    ],
)
def test_rejection_with_an_unknown_or_missing_error_reports_other(raw: bytes) -> None:
    error = rejection(400, raw)
    assert error.oauth_error == "other"
    assert "hunter2-sentinel" not in str(error)
    assert "error=other" in error.detail


def test_the_body_limit_is_64_kib() -> None:
    assert MAX_BODY_BYTES == 64 * 1024


def test_missing_expires_in_falls_back_to_the_jwt_exp_claim() -> None:
    grant = parse_success(body(access_token=jwt({"exp": NOW + 900, "sub": "svc"})))
    assert grant.expires_in_s == 900.0


def test_explicit_expires_in_wins_over_the_jwt_exp_claim() -> None:
    grant = parse_success(body(access_token=jwt({"exp": NOW + 900}), expires_in=60))
    assert grant.expires_in_s == 60.0


@pytest.mark.parametrize("claims", [{}, {"exp": "soon"}, {"exp": True}])
def test_a_jwt_without_a_usable_exp_leaves_the_lifetime_to_the_default(
    claims: dict[str, object],
) -> None:
    assert parse_success(body(access_token=jwt(claims))).expires_in_s is None


def test_an_opaque_token_without_expires_in_leaves_the_lifetime_to_the_default() -> None:
    assert parse_success(body(access_token="opaque-token")).expires_in_s is None


def test_a_jwt_that_already_expired_is_refused() -> None:
    raw = body(access_token=jwt({"exp": NOW - 1}))
    assert invalid(raw) == "the access token's exp claim is already in the past"
