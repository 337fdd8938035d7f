"""Discovery: a client's token endpoint from its issuer's metadata, fetched once.

OpenID Connect Discovery (``{issuer}/.well-known/openid-configuration``) is tried
first, then RFC 8414 (``{origin}/.well-known/oauth-authorization-server{path}``).
The document must name the configured issuer (RFC 8414 §3.3, a guard against
metadata mix-ups) and a token endpoint that is https, or http on loopback. Results
are cached per issuer for ``ttl_s``; failures are not cached here (the token cache
holds failed fetches back). A client that authenticates with its TLS certificate uses
the document's ``mtls_endpoint_aliases.token_endpoint`` when there is one (RFC 8705
§5): IdPs often ask for client certificates on a separate host or port.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import aiohttp

from m2m_proxy.authority import secure_or_loopback
from m2m_proxy.errors import TokenResponseInvalidError

MAX_DOCUMENT_BYTES = 256 * 1024


class DiscoveryUnavailableError(Exception):
    """The metadata could not be fetched now (network error, 5xx, 429): worth a retry."""


def metadata_urls(issuer: str) -> tuple[str, str]:
    """The OIDC and the RFC 8414 well-known URLs of ``issuer``."""
    base = issuer.rstrip("/")
    parts = urlsplit(base)
    origin = f"{parts.scheme}://{parts.netloc}"
    return (
        f"{base}/.well-known/openid-configuration",
        f"{origin}/.well-known/oauth-authorization-server{parts.path}",
    )


class Discovery:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        ttl_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._ttl_s = ttl_s
        self._clock = clock
        self._endpoints: dict[str, tuple[float, str, str | None]] = {}

    async def token_endpoint(
        self, issuer: str, *, mtls: bool = False, tls: ssl.SSLContext | None = None
    ) -> str:
        """The token endpoint of ``issuer`` (its mTLS alias when ``mtls`` and there is
        one); raises DiscoveryUnavailableError or TokenResponseInvalidError (the
        document is missing or wrong). ``tls`` verifies the IdP (None: system store)."""
        cached = self._endpoints.get(issuer)
        if cached is None or self._clock() >= cached[0]:
            cached = await self._discover(issuer, tls)
            self._endpoints[issuer] = cached
        _, endpoint, mtls_alias = cached
        return mtls_alias if mtls and mtls_alias is not None else endpoint

    async def _discover(
        self, issuer: str, tls: ssl.SSLContext | None
    ) -> tuple[float, str, str | None]:
        for url in metadata_urls(issuer):
            document = await self._get(url, tls)
            if document is not None:
                endpoint = _token_endpoint_of(document, issuer, url)
                return (self._clock() + self._ttl_s, endpoint, _mtls_alias_of(document, url))
        tried = " and ".join(metadata_urls(issuer))
        raise TokenResponseInvalidError(
            f"no discovery document for issuer {issuer} (tried {tried}); "
            "check the issuer or set token_url instead"
        )

    async def _get(self, url: str, tls: ssl.SSLContext | None) -> dict[str, object] | None:
        """The JSON object at ``url``, or None for a 404/410."""
        try:
            async with self._session.get(
                url,
                headers={"Accept": "application/json"},
                allow_redirects=False,
                ssl=tls if tls is not None else True,
            ) as resp:
                body = await resp.content.read(MAX_DOCUMENT_BYTES + 1)
                status = resp.status
        except aiohttp.ClientError as exc:
            raise DiscoveryUnavailableError(f"network error ({type(exc).__name__})") from None
        if status in (404, 410):
            return None
        if status == 429 or status >= 500:
            raise DiscoveryUnavailableError(f"HTTP {status} from {url}")
        if status != 200 or len(body) > MAX_DOCUMENT_BYTES:
            raise TokenResponseInvalidError(
                f"the discovery document at {url} answered HTTP {status} or was too large"
            )
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise TokenResponseInvalidError(
                f"the discovery document at {url} is not JSON"
            ) from None
        if not isinstance(document, dict):
            raise TokenResponseInvalidError(f"the discovery document at {url} is not an object")
        return document


def _token_endpoint_of(document: dict[str, object], issuer: str, url: str) -> str:
    named = document.get("issuer")
    if not isinstance(named, str) or named.rstrip("/") != issuer.rstrip("/"):
        raise TokenResponseInvalidError(
            f"the discovery document at {url} names another issuer; the configured issuer "
            "must be exactly the IdP's issuer identifier"
        )
    endpoint = document.get("token_endpoint")
    if not isinstance(endpoint, str) or not endpoint:
        raise TokenResponseInvalidError(
            f"the discovery document at {url} has no token_endpoint; set token_url instead"
        )
    return _checked_endpoint(endpoint, "token_endpoint", url)


def _mtls_alias_of(document: dict[str, object], url: str) -> str | None:
    aliases = document.get("mtls_endpoint_aliases")
    if not isinstance(aliases, dict):
        return None
    alias = aliases.get("token_endpoint")
    if not isinstance(alias, str) or not alias:
        return None
    return _checked_endpoint(alias, "mtls_endpoint_aliases.token_endpoint", url)


def _checked_endpoint(endpoint: str, field: str, url: str) -> str:
    try:
        parts = urlsplit(endpoint)
    except ValueError:
        raise TokenResponseInvalidError(
            f"the discovery document at {url} has an invalid {field}"
        ) from None
    if not secure_or_loopback(parts.scheme, parts.hostname):
        raise TokenResponseInvalidError(
            f"the discovery document at {url} names a {field} that is not https"
        )
    return endpoint
