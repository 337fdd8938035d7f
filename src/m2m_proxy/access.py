"""Access: who may use a route. Source addresses (``allow_from``) and proxy users
(``allow_users``, ``Proxy-Authorization: Basic``), a route's policy replacing the
proxy's default.

Checked before the request body is read (and before ``100 Continue`` is sent), and for
CONNECT before any upstream connection. Passwords are compared in constant time, and
an unknown user costs the same comparison as a known one. The credentials are never
forwarded or logged.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
from collections.abc import Mapping

from m2m_proxy.config import AccessPolicy, Secret
from m2m_proxy.errors import AccessDeniedError, ProxyAuthRequiredError

_DUMMY = b"\x00" * 32


class Access:
    def __init__(self, default: AccessPolicy, users: Mapping[str, Secret]) -> None:
        self._default = default
        self.open_by_default = default.is_open
        """No proxy-wide rule: a route without its own needs no check at all."""
        self._passwords = {name: secret.value.encode() for name, secret in users.items()}

    def check(
        self,
        policy: AccessPolicy | None,
        peer: str | None,
        proxy_authorization: str | None,
        *,
        user: str | None = None,
    ) -> str | None:
        """Raise AccessDeniedError (403) or ProxyAuthRequiredError (407); return the
        user this request acts as. ``user``: already authenticated (at CONNECT)."""
        rule = policy if policy is not None else self._default
        if rule.allow_from is not None and not _from_allowed(peer, rule.allow_from):
            raise AccessDeniedError("this client's address may not use this route (allow_from)")
        if rule.allow_users is None:
            return user
        if user is None:
            user = self.authenticate(proxy_authorization)
            if user is None:
                raise ProxyAuthRequiredError(
                    "log in with Proxy-Authorization: Basic (a user from proxy.users)"
                    if proxy_authorization is None
                    else "the proxy user name or password is wrong"
                )
        if user not in rule.allow_users:
            raise AccessDeniedError(f"user '{user}' may not use this route (allow_users)")
        return user

    def authenticate(self, header: str | None) -> str | None:
        """The user whose Basic credentials ``header`` carries, or None."""
        if header is None:
            return None
        scheme, _, encoded = header.strip().partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        name, sep, password = decoded.partition(":")
        if not sep:
            return None
        expected = self._passwords.get(name)
        matches = hmac.compare_digest(password.encode(), expected if expected else _DUMMY)
        return name if matches and expected is not None else None


def _from_allowed(
    peer: str | None, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> bool:
    if peer is None:
        return False
    try:
        address = ipaddress.ip_address(peer.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)
