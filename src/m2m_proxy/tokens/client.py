"""TokenClient: one client-credentials grant (RFC 6749 §4.4) over HTTP, with retries.

Foreign exceptions are translated here, once: aiohttp errors and timeouts become
the Token* errors of :mod:`m2m_proxy.errors`. tenacity retries network errors, 5xx
and 429 (honouring ``Retry-After``) with exponential backoff and jitter, never a
400/401. The whole fetch, retries included, fits in ``timeout_s``. Redirects from
the token endpoint are never followed.

Credentials come from :class:`~m2m_proxy.tokens.material.ClientMaterial`, checked for
changed files before every fetch; each grant carries the fingerprint of the material
that obtained it.
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import replace
from urllib.parse import quote_plus

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)

from m2m_proxy.config import AuthMethod, ClientConfig, CredentialSpec
from m2m_proxy.errors import (
    TokenRejectedError,
    TokenResponseInvalidError,
    TokenTimeoutError,
    TokenUnavailableError,
)
from m2m_proxy.tokens.assertion import ASSERTION_TYPE, client_assertion
from m2m_proxy.tokens.discovery import Discovery, DiscoveryUnavailableError
from m2m_proxy.tokens.material import ClientMaterial
from m2m_proxy.tokens.model import TokenGrant
from m2m_proxy.tokens.response import MAX_BODY_BYTES, parse_success, rejection

JWT_METHODS = frozenset({AuthMethod.CLIENT_SECRET_JWT, AuthMethod.PRIVATE_KEY_JWT})
_BACKOFF = wait_exponential_jitter(multiplier=0.2, max=2.0, jitter=0.2)
_RETRY_AFTER_CAP_S = 30.0


class _TransientError(Exception):
    """Worth retrying: network error, 5xx or 429."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class TokenClient:
    """Fetches grants for credentials; holds no state beyond its collaborators."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        material: ClientMaterial,
        *,
        timeout_s: float,
        retries: int,
        discovery: Discovery | None = None,
    ) -> None:
        self._session = session
        self._active_secret: dict[str, int] = {}
        self._discovery = discovery if discovery is not None else Discovery(session)
        self._material = material
        self._timeout_s = timeout_s
        self._retries = retries

    async def fetch(self, spec: CredentialSpec) -> TokenGrant:
        """Request a token for ``spec``; raise a TokenError subclass on failure.

        Changed credential files are read first. During a secret rotation
        (``fallback_secrets``) an ``invalid_client`` answer makes it try the
        client's other secrets in order; the one that works is remembered and tried
        first from then on. If every secret is refused, the files are checked once
        more (the IdP may have switched before the proxy saw the new file).
        """
        self._material.refresh()
        fingerprint = self._material.fingerprint(spec.client)
        try:
            grant = await self._fetch_with_secrets(self._material.client(spec.client), spec)
        except TokenRejectedError as exc:
            if exc.oauth_error != "invalid_client":
                raise
            self._material.refresh()
            if self._material.fingerprint(spec.client) == fingerprint:
                raise
            fingerprint = self._material.fingerprint(spec.client)
            grant = await self._fetch_with_secrets(self._material.client(spec.client), spec)
        return replace(grant, fingerprint=fingerprint)

    async def _fetch_with_secrets(self, client: ClientConfig, spec: CredentialSpec) -> TokenGrant:
        secrets = (client.client_secret, *client.fallback_secrets)
        if len(secrets) == 1:
            return await self._fetch(client, spec)
        start = self._active_secret.get(client.name, 0) % len(secrets)
        order = [*range(start, len(secrets)), *range(start)]
        for tried, index in enumerate(order, start=1):
            try:
                grant = await self._fetch(replace(client, client_secret=secrets[index]), spec)
            except TokenRejectedError as exc:
                if exc.oauth_error != "invalid_client" or tried == len(order):
                    raise
                continue
            self._active_secret[client.name] = index
            return grant
        raise AssertionError("unreachable: the last secret returns or raises")  # pragma: no cover

    async def _fetch(self, client: ClientConfig, spec: CredentialSpec) -> TokenGrant:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_TransientError),
            stop=stop_after_attempt(self._retries + 1) | stop_before_delay(self._timeout_s),
            wait=_wait,
            reraise=True,
        )
        try:
            async with asyncio.timeout_at(asyncio.get_running_loop().time() + self._timeout_s):
                async for attempt in retrying:
                    with attempt:
                        return await self._attempt(client, spec)
        except TimeoutError:
            raise TokenTimeoutError(
                f"the token endpoint of client '{client.name}' did not answer within "
                f"{self._timeout_s:g}s",
                retry_after_s=1.0,
            ) from None
        except _TransientError as exc:
            raise TokenUnavailableError(
                f"the token endpoint of client '{client.name}' failed: {exc.reason}",
                retry_after_s=exc.retry_after_s or 1.0,
            ) from None
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover

    async def _attempt(self, client: ClientConfig, spec: CredentialSpec) -> TokenGrant:
        """One token request; each attempt signs a fresh client assertion (new jti)."""
        tls = self._material.idp_context(client.name)
        try:
            url = client.token_url or await self._discovery.token_endpoint(
                str(client.issuer), mtls=client.certificate is not None, tls=tls
            )
            assertion = None
            if client.assertion_file is not None:
                assertion = read_assertion_file(client.assertion_file)
            elif client.auth_method in JWT_METHODS:
                assertion = client_assertion(client, audience=client.issuer or url, now=time.time())
            form, headers = build_request(client, spec, assertion=assertion)
            async with self._session.post(
                url,
                data=form,
                headers=headers,
                allow_redirects=False,
                ssl=tls if tls is not None else True,
            ) as resp:
                body = await resp.content.read(MAX_BODY_BYTES + 1)
                status = resp.status
                retry_after = _retry_after(resp.headers.get("Retry-After"))
        except aiohttp.ClientError as exc:
            raise _TransientError(f"network error ({type(exc).__name__})") from None
        except DiscoveryUnavailableError as exc:
            raise _TransientError(f"discovery failed: {exc}") from None
        if status == 429 or status >= 500:
            raise _TransientError(f"HTTP {status}", retry_after)
        if len(body) > MAX_BODY_BYTES:
            raise TokenResponseInvalidError(f"the token response is over {MAX_BODY_BYTES} bytes")
        if status == 200:
            return parse_success(body, now=time.time())
        if 400 <= status < 500:
            raise rejection(status, body)
        raise TokenResponseInvalidError(
            f"the token endpoint answered HTTP {status} (redirects are never followed); "
            "check token_url"
        )


def build_request(
    client: ClientConfig, spec: CredentialSpec, *, assertion: str | None = None
) -> tuple[dict[str, str], dict[str, str]]:
    """The form and headers of a token request; pure, so tests can assert on it.

    ``assertion`` is the signed client assertion of the JWT auth methods.
    """
    form: dict[str, str] = {"grant_type": "client_credentials"}
    form.update(client.token_params)
    form.update(spec.token_params)
    if spec.scope:
        form["scope"] = " ".join(spec.scope)
    if spec.audience:
        form["audience"] = spec.audience
    if spec.resource:
        form["resource"] = spec.resource
    headers = {"Accept": "application/json"}
    if client.auth_method.uses_certificate:
        form["client_id"] = client.client_id  # RFC 8705 §2: the certificate authenticates
        return form, headers
    if client.auth_method in JWT_METHODS:
        if assertion is None:
            raise ValueError(f"{client.auth_method.value} needs a client assertion")
        form["client_id"] = client.client_id
        form["client_assertion_type"] = ASSERTION_TYPE
        form["client_assertion"] = assertion
        return form, headers
    if client.client_secret is None:
        raise ValueError(f"{client.auth_method.value} needs a client secret")
    if client.auth_method is AuthMethod.CLIENT_SECRET_BASIC:
        # RFC 6749 §2.3.1 / App. B: form-encode id and secret before base64.
        pair = f"{quote_plus(client.client_id)}:{quote_plus(client.client_secret.value)}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    else:
        form["client_id"] = client.client_id
        form["client_secret"] = client.client_secret.value
    return form, headers


def read_assertion_file(path: str) -> str:
    """The current assertion in ``path`` (rotated on disk by its producer)."""
    try:
        with open(path, encoding="utf-8") as file:  # small file; a blocking read is fine
            assertion = file.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise _TransientError(f"cannot read client_assertion_file ({type(exc).__name__})") from None
    if not assertion:
        raise _TransientError("client_assertion_file is empty")
    return assertion


def _wait(state: RetryCallState) -> float:
    """Backoff with jitter, or the server's Retry-After when it gave one."""
    exc = state.outcome.exception() if state.outcome else None
    if isinstance(exc, _TransientError) and exc.retry_after_s is not None:
        return min(exc.retry_after_s, _RETRY_AFTER_CAP_S)
    return float(_BACKOFF(state))


def _retry_after(value: str | None) -> float | None:
    """Retry-After in delta-seconds (HTTP-dates are rare on token endpoints: ignored)."""
    if value is None or not (value.strip().isascii() and value.strip().isdigit()):
        return None
    return float(value.strip())
