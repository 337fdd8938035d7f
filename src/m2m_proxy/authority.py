"""Host and port rules shared by config, routing and request parsing. Pure functions.

A host is normalised once, at the edge: ASCII lower case, one trailing dot removed,
IPv6 literals without brackets. Ports equal to the scheme's default become ``None``
so that ``api.x`` and ``api.x:443`` are the same https destination.
"""

from __future__ import annotations

import functools
import ipaddress
import re

DEFAULT_PORTS = {"http": 80, "https": 443}

# RFC 3986 reg-name restricted to what DNS names can carry, plus "_" seen in
# internal service names. Anything else (spaces, "@", "%", non-ASCII) is refused.
_REG_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")


class AuthorityError(ValueError):
    """The text is not a usable host[:port]; the message says why."""


def normalize_host(host: str) -> str:
    """Lower-case, drop one trailing dot; raise AuthorityError if not a valid host."""
    if host.startswith("[") and host.endswith("]"):
        return _ipv6(host[1:-1])
    host = host.lower()
    if host.endswith("."):
        host = host[:-1]
    if ":" in host:
        return _ipv6(host)
    if not host or len(host) > 253 or not _REG_NAME.match(host):
        raise AuthorityError(f"'{host}' is not a valid host name")
    return host


def _ipv6(text: str) -> str:
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        raise AuthorityError(f"'{text}' is not a valid IPv6 address") from None


@functools.lru_cache(maxsize=4096)
def split_authority(authority: str, *, allow_zero: bool = False) -> tuple[str, int | None]:
    """'Host:8080' → ('host', 8080); '[::1]' → ('::1', None). Host is normalised.

    Memoised (bounded): the same few authorities arrive on every request, and the
    validation regex is the costliest step of parsing a target.
    """
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise AuthorityError(f"'{authority}' has an unclosed '['")
        host, rest = authority[: end + 1], authority[end + 1 :]
        if rest and not rest.startswith(":"):
            raise AuthorityError(f"'{authority}' has text after the IPv6 address")
        port_text = rest[1:] if rest else None
    elif authority.count(":") == 1:
        host, port_text = authority.split(":")
    else:
        host, port_text = authority, None
    port = parse_port(port_text, allow_zero=allow_zero) if port_text is not None else None
    return normalize_host(host), port


def parse_port(text: str, *, allow_zero: bool = False) -> int:
    """A TCP port; 0 (any free port) only where ``allow_zero``, i.e. for listeners."""
    low = 0 if allow_zero else 1
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or not low <= int(text) < 65536:
        raise AuthorityError(f"port '{text}' must be a number from {low} to 65535")
    return int(text)


def effective_port(scheme: str, port: int | None) -> int:
    """The port to connect to: the given one or the scheme's default."""
    return DEFAULT_PORTS[scheme] if port is None else port


def canonical_port(scheme: str, port: int | None) -> int | None:
    """``None`` for the scheme's default port, else the port."""
    return None if port == DEFAULT_PORTS.get(scheme) else port


def secure_or_loopback(scheme: str, host: str | None) -> bool:
    """https anywhere, plain http only to loopback: the rule for IdP endpoints."""
    return scheme == "https" or (scheme == "http" and host is not None and is_loopback(host))


def is_loopback(host: str) -> bool:
    """True for localhost names and loopback IP literals (127.0.0.0/8, ::1)."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
