"""Where a request is going: the request-target and Host header → :class:`Target`. Pure.

Routing happens on the raw target, as the client wrote it (RFC 9112 §3.2):
absolute-form (``GET http://api.x/p``, what HTTP_PROXY clients send) wins over a
conflicting Host header; origin-form (``GET /p``) takes the host from Host. The path
and query are kept byte for byte so the upstream sees exactly what the client sent.
"""

from __future__ import annotations

from typing import NamedTuple

from m2m_proxy.authority import DEFAULT_PORTS, AuthorityError, canonical_port, split_authority
from m2m_proxy.errors import BadRequestError, MisdirectedRequestError


class Target(NamedTuple):
    """A destination: ``port`` None means the scheme's default port.

    A NamedTuple rather than a frozen dataclass: it is built once per request, and
    tuple construction costs a quarter of a frozen dataclass's ``__init__``.
    """

    scheme: str
    host: str
    port: int | None
    path_qs: str

    @property
    def path(self) -> str:
        return self.path_qs.partition("?")[0]

    @property
    def authority(self) -> str:
        """The Host header value for this target."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"


def parse_target(raw_target: str, host_header: str | None) -> Target:
    """Parse a request-target; raise BadRequestError with a reason if it is unusable."""
    if raw_target.startswith("/"):
        if not host_header:
            raise BadRequestError(
                "the request has no Host header; send one or use an absolute URL (http://host/path)"
            )
        scheme, authority, path_qs = "http", host_header, raw_target
    else:
        scheme, sep, rest = raw_target.partition("://")
        scheme = scheme.lower()
        if not sep or scheme not in DEFAULT_PORTS:
            raise BadRequestError(
                "the request target must be an http:// or https:// URL or a path starting with '/'"
            )
        slash, query = rest.find("/"), rest.find("?")
        cut = slash if slash >= 0 and (query < 0 or slash < query) else query
        if cut < 0:
            cut = len(rest)
        authority, path_qs = rest[:cut], rest[cut:]
        if not path_qs.startswith("/"):
            path_qs = "/" + path_qs
    if "@" in authority:
        raise BadRequestError(
            "user information (user:password@) in the target is refused; remove it from the URL"
        )
    if "#" in path_qs:
        raise BadRequestError("the request target must not contain a '#fragment'")
    try:
        host, port = split_authority(authority)
    except AuthorityError as exc:
        raise BadRequestError(f"bad target host: {exc}") from None
    _refuse_dot_segments(path_qs)
    return Target(scheme, host, canonical_port(scheme, port), path_qs)


class TunnelOrigin(NamedTuple):
    """Where an intercepted tunnel leads: the CONNECT authority (or the SNI in
    transparent mode). ``port`` None is 443. ``sni_mismatch``: the client's TLS SNI
    named another host, so nothing in this tunnel gets a token."""

    host: str
    port: int | None
    sni_mismatch: bool = False
    user: str | None = None
    """The proxy user authenticated at CONNECT (allow_users), for every request inside."""

    @property
    def authority(self) -> str:
        return Target("https", self.host, self.port, "/").authority


def parse_tunneled_target(raw_target: str, host_header: str | None, tunnel: TunnelOrigin) -> Target:
    """A request inside an intercepted tunnel: https to the tunnel's origin only.

    Origin-form takes the tunnel's origin; Host (or an absolute-form target) must name
    that same origin, else MisdirectedRequestError (421) and no token.
    """
    if tunnel.sni_mismatch:
        raise MisdirectedRequestError(
            f"the TLS server name differs from the CONNECT host {tunnel.authority}"
        )
    if raw_target.startswith("/"):
        if "#" in raw_target:
            raise BadRequestError("the request target must not contain a '#fragment'")
        _refuse_dot_segments(raw_target)
        target = Target("https", tunnel.host, tunnel.port, raw_target)
        if host_header is None:
            return target
        try:
            host, port = split_authority(host_header)
        except AuthorityError as exc:
            raise BadRequestError(f"bad Host header: {exc}") from None
        named = Target("https", host, canonical_port("https", port), raw_target)
    else:
        target = named = parse_target(raw_target, host_header)
    if (named.scheme, named.host, named.port) != ("https", tunnel.host, tunnel.port):
        raise MisdirectedRequestError(
            f"this tunnel leads to {tunnel.authority}; send requests for other hosts "
            "through their own CONNECT"
        )
    return target


def _refuse_dot_segments(path_qs: str) -> None:
    """Refuse '.' and '..' segments (also %2e-encoded): they would escape a path_prefix."""
    path = path_qs.partition("?")[0]
    if "." not in path and "%" not in path:
        return
    for segment in path.split("/"):
        if segment.lower().replace("%2e", ".") in (".", ".."):
            raise BadRequestError(
                "the path contains '.' or '..' segments; send the normalised path"
            )
