"""render_problem: status, problem+json body, Proxy-Status (RFC 9209), Retry-After."""

from __future__ import annotations

import json
import re

import pytest

from m2m_proxy.errors import (
    PROBLEM_CONTENT_TYPE,
    BadRequestError,
    NotSupportedError,
    ProxyError,
    RouteDeniedError,
    TokenRejectedError,
    TokenResponseInvalidError,
    TokenTimeoutError,
    TokenUnavailableError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
    UpstreamTlsError,
    UpstreamUnreachableError,
    render_problem,
)

# RFC 8941 sf-token and sf-string, for the Proxy-Status list member.
_SF_TOKEN = r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*"
_SF_STRING = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*"'
_PROXY_STATUS = re.compile(
    rf"^(?:{_SF_TOKEN}|{_SF_STRING}); error=(?:{_SF_TOKEN}); details=(?:{_SF_STRING})$"
)


@pytest.mark.parametrize(
    ("error", "status", "code", "proxy_status"),
    [
        (BadRequestError("d"), 400, "bad_request", "http_request_error"),
        (RouteDeniedError("d"), 403, "route_denied", "http_request_denied"),
        (NotSupportedError("d"), 501, "not_supported", "http_request_error"),
        (TokenUnavailableError("d"), 502, "token_unavailable", "proxy_internal_error"),
        (TokenTimeoutError("d"), 504, "token_timeout", "proxy_internal_error"),
        (
            TokenRejectedError("d", oauth_error="invalid_client"),
            502,
            "token_rejected",
            "proxy_internal_error",
        ),
        (TokenResponseInvalidError("d"), 502, "token_response_invalid", "proxy_internal_error"),
        (UpstreamUnreachableError("d"), 502, "upstream_unreachable", "connection_refused"),
        (UpstreamTlsError("d"), 502, "upstream_tls_error", "tls_certificate_error"),
        (UpstreamTimeoutError("d"), 504, "upstream_timeout", "connection_timeout"),
        (UpstreamProtocolError("d"), 502, "upstream_protocol_error", "http_protocol_error"),
    ],
)
def test_each_error_renders_its_status_code_and_proxy_status(
    error: ProxyError, status: int, code: str, proxy_status: str
) -> None:
    rendered_status, headers, body = render_problem(error, "m2m-proxy")
    assert rendered_status == status
    assert headers["Proxy-Status"] == f'm2m-proxy; error={proxy_status}; details="{code}"'
    assert json.loads(body)["code"] == code


def test_problem_body_is_rfc9457_json_with_our_detail() -> None:
    status, headers, body = render_problem(
        RouteDeniedError("no route matches host 'x.example'"), "edge-1"
    )
    assert status == 403
    assert headers["Content-Type"] == PROBLEM_CONTENT_TYPE == "application/problem+json"
    assert headers["Cache-Control"] == "no-store"
    assert json.loads(body) == {
        "type": "urn:m2m-proxy:error:route_denied",
        "title": "No route allows this destination",
        "status": 403,
        "code": "route_denied",
        "detail": "no route matches host 'x.example'",
    }


def test_detail_with_quotes_and_non_ascii_stays_valid_json() -> None:
    _, _, body = render_problem(BadRequestError('bad "host" ä\n'), "m2m-proxy")
    assert json.loads(body)["detail"] == 'bad "host" ä\n'


def test_proxy_status_is_a_valid_structured_field_for_the_default_name() -> None:
    _, headers, _ = render_problem(UpstreamTimeoutError("d"), "m2m-proxy")
    assert _PROXY_STATUS.match(headers["Proxy-Status"])


@pytest.mark.parametrize("name", ["1proxy", "-edge", ".p", "_p", "proxy.eu-1_a"])
def test_proxy_status_stays_a_valid_structured_field_for_any_allowed_name(name: str) -> None:
    # proxy.name allows ^[A-Za-z0-9._-]{1,64}$; names that are not an sf-token
    # (leading digit, '-', '.', '_') must be sent as an sf-string.
    _, headers, _ = render_problem(UpstreamTimeoutError("d"), name)
    assert _PROXY_STATUS.match(headers["Proxy-Status"]), headers["Proxy-Status"]


def test_no_retry_after_unless_the_error_carries_one() -> None:
    _, headers, _ = render_problem(TokenUnavailableError("d"), "m2m-proxy")
    assert "Retry-After" not in headers


@pytest.mark.parametrize(("seconds", "header"), [(0.0, "1"), (0.2, "1"), (3.0, "3"), (29.6, "30")])
def test_retry_after_is_whole_seconds_and_at_least_one(seconds: float, header: str) -> None:
    _, headers, _ = render_problem(TokenUnavailableError("d", retry_after_s=seconds), "m2m-proxy")
    assert headers["Retry-After"] == header


def test_token_rejected_keeps_the_oauth_error_code() -> None:
    error = TokenRejectedError("refused", oauth_error="invalid_scope")
    assert error.oauth_error == "invalid_scope"
    assert isinstance(error, ProxyError)
    assert error.detail == "refused"
