"""Errors a client of the proxy can see, and the one place that renders them.

The hierarchy is deliberately shallow::

    ProxyError                      status  code
    ├── BadRequestError               400   bad_request
    ├── RouteDeniedError              403   route_denied
    ├── AccessDeniedError             403   access_denied
    ├── DestinationDeniedError        403   destination_denied
    ├── ProxyAuthRequiredError        407   proxy_auth_required
    ├── MethodNotAllowedError         405   method_not_allowed
    ├── PayloadTooLargeError          413   payload_too_large
    ├── MisdirectedRequestError       421   misdirected_request
    ├── LoopDetectedError             508   loop_detected
    ├── NotSupportedError             501   not_supported
    │   └── TransferCodingNotSupportedError 501 not_supported
    ├── VersionNotSupportedError      505   version_not_supported
    ├── TokenError                          (the IdP side)
    │   ├── TokenUnavailableError     502   token_unavailable
    │   ├── TokenTimeoutError         504   token_timeout
    │   ├── TokenRejectedError        502   token_rejected
    │   └── TokenResponseInvalidError 502   token_response_invalid
    └── UpstreamError                       (the API side)
        ├── UpstreamUnreachableError  502   upstream_unreachable
        ├── UpstreamTlsError          502   upstream_tls_error
        ├── UpstreamTimeoutError      504   upstream_timeout
        └── UpstreamProtocolError     502   upstream_protocol_error

Each class carries its HTTP status, a stable machine ``code`` and the RFC 9209
``Proxy-Status`` error type. Messages are written by this project, never copied
from a peer: an IdP's body, a token or a secret must never reach ``detail``.
"""

from __future__ import annotations

import json
import re
from typing import Self

PROBLEM_CONTENT_TYPE = "application/problem+json"
_SF_TOKEN = re.compile(r"[A-Za-z*][A-Za-z0-9!#$%&'*+.^_`|~:/-]*")  # RFC 8941 sf-token


class ProxyError(Exception):
    """Base class: an outcome the proxy reports to its client as a problem document."""

    # Class-level defaults; an instance may override them (see frontdoor.py).
    status: int = 500
    code: str = "internal_error"
    proxy_status: str = "proxy_internal_error"
    title: str = "The proxy failed to handle the request"

    def __init__(self, detail: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after_s = retry_after_s

    def with_retry_after(self, seconds: float) -> Self:
        """A copy of this error telling the client when to retry."""
        clone = type(self).__new__(type(self))  # no __init__: subclasses take other arguments
        clone.__dict__.update(self.__dict__)
        clone.args = self.args
        clone.retry_after_s = seconds
        return clone


class BadRequestError(ProxyError):
    status = 400
    code = "bad_request"
    proxy_status = "http_request_error"
    title = "The request to the proxy is malformed"


class RouteDeniedError(ProxyError):
    status = 403
    code = "route_denied"
    proxy_status = "http_request_denied"
    title = "No route allows this destination"


class AccessDeniedError(ProxyError):
    """The client's address may not use this route (allow_from)."""

    status = 403
    code = "access_denied"
    proxy_status = "http_request_denied"
    title = "This client may not use this route"


class DestinationDeniedError(ProxyError):
    """Egress policy: the destination resolves to a private, loopback, link-local or
    metadata address that no route or allow_destinations entry names."""

    status = 403
    code = "destination_denied"
    proxy_status = "destination_ip_prohibited"
    title = "The destination address is not allowed"


class ProxyAuthRequiredError(ProxyError):
    """allow_users: no, or wrong, Proxy-Authorization: Basic credentials."""

    status = 407
    code = "proxy_auth_required"
    proxy_status = "http_request_denied"
    title = "Proxy authentication is required for this route"


class MethodNotAllowedError(ProxyError):
    status = 405
    code = "method_not_allowed"
    proxy_status = "http_request_denied"
    title = "The method is not allowed through this route"


class PayloadTooLargeError(ProxyError):
    status = 413
    code = "payload_too_large"
    proxy_status = "http_request_error"
    title = "The request body is larger than this route allows"


class LoopDetectedError(ProxyError):
    status = 508
    code = "loop_detected"
    proxy_status = "proxy_loop_detected"
    title = "The request would loop back to this proxy"


class MisdirectedRequestError(ProxyError):
    """Inside an intercepted tunnel, the request (Host, target or SNI) names another host."""

    status = 421
    code = "misdirected_request"
    proxy_status = "http_request_denied"
    title = "The request names another host than its tunnel"


class NotSupportedError(ProxyError):
    status = 501
    code = "not_supported"
    proxy_status = "http_request_error"
    title = "The proxy does not support this kind of request"


class TransferCodingNotSupportedError(NotSupportedError):
    """RFC 9112 §6.1: a transfer coding the proxy does not implement."""


class BodyStalledError(ProxyError):
    """The client stopped sending its request body (``proxy.body_timeout_s``)."""

    status = 408
    code = "body_timeout"
    proxy_status = "http_request_error"
    title = "The request body stopped arriving"


class VersionNotSupportedError(ProxyError):
    status = 505
    code = "version_not_supported"
    proxy_status = "http_request_error"
    title = "Only HTTP/1.0 and HTTP/1.1 are supported"


class TokenError(ProxyError):
    """The access token for the route could not be obtained."""

    status = 502
    code = "token_unavailable"
    proxy_status = "proxy_internal_error"
    title = "No access token could be obtained for this route"


class TokenUnavailableError(TokenError):
    """The token endpoint was unreachable or failed (5xx, 429) after retries."""


class TokenTimeoutError(TokenError):
    status = 504
    code = "token_timeout"
    title = "The token endpoint did not answer in time"


class TokenRejectedError(TokenError):
    """The IdP refused the client (RFC 6749 §5.2): a configuration error."""

    code = "token_rejected"
    title = "The identity provider rejected the proxy's client credentials"

    def __init__(self, detail: str, *, oauth_error: str) -> None:
        super().__init__(detail)
        self.oauth_error = oauth_error


class TokenResponseInvalidError(TokenError):
    code = "token_response_invalid"
    title = "The token endpoint answered with an unusable response"


class UpstreamError(ProxyError):
    status = 502
    code = "upstream_error"
    proxy_status = "proxy_internal_error"
    title = "The upstream API could not be reached"


class UpstreamUnreachableError(UpstreamError):
    code = "upstream_unreachable"
    proxy_status = "connection_refused"


class UpstreamTlsError(UpstreamError):
    code = "upstream_tls_error"
    proxy_status = "tls_certificate_error"
    title = "TLS with the upstream API failed"


class UpstreamTimeoutError(UpstreamError):
    status = 504
    code = "upstream_timeout"
    proxy_status = "connection_timeout"
    title = "The upstream API did not answer in time"


class UpstreamProtocolError(UpstreamError):
    code = "upstream_protocol_error"
    proxy_status = "http_protocol_error"
    title = "The upstream API sent an invalid or incomplete response"


def render_problem(error: ProxyError, proxy_name: str) -> tuple[int, dict[str, str], bytes]:
    """Return (status, headers, body) for ``error`` as RFC 9457 problem+json.

    The ``Proxy-Status`` header follows RFC 9209; ``details`` is our own text only.
    """
    body = {
        "type": f"urn:m2m-proxy:error:{error.code}",
        "title": error.title,
        "status": error.status,
        "code": error.code,
        "detail": error.detail,
    }
    name = proxy_name if _SF_TOKEN.fullmatch(proxy_name) else f'"{_sf_escape(proxy_name)}"'
    details = _sf_escape(error.code)
    headers = {
        "Content-Type": PROBLEM_CONTENT_TYPE,
        "Proxy-Status": f'{name}; error={error.proxy_status}; details="{details}"',
        "Cache-Control": "no-store",
    }
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after_s)))
    if isinstance(error, ProxyAuthRequiredError):
        headers["Proxy-Authenticate"] = f'Basic realm="{_sf_escape(proxy_name)}", charset="UTF-8"'
    return error.status, headers, json.dumps(body).encode()


def _sf_escape(text: str) -> str:
    """Escape for an RFC 8941 sf-string."""
    return text.replace("\\", "\\\\").replace('"', '\\"')
