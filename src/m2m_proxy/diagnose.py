"""``m2m-proxy token``: which route and client a destination gets, and what token.

Pure formatting: the route lookup uses the proxy's own RouteTable and target
parser; the token is fetched by app.py exactly as the running proxy would. The
token itself is printed only on request (``--show-token``).
"""

from __future__ import annotations

import time

from m2m_proxy.config import Config, RouteConfig
from m2m_proxy.routing import RouteTable
from m2m_proxy.target import Target, parse_target
from m2m_proxy.tokens.model import TokenGrant
from m2m_proxy.tokens.response import jwt_claims

CLAIMS_SHOWN = ("iss", "sub", "aud", "azp", "client_id", "scope", "scp", "iat", "exp")
TIME_CLAIMS = frozenset({"iat", "exp", "nbf"})


def resolve(config: Config, destination: str) -> tuple[Target, RouteConfig | None]:
    """The target for ``HOST[:PORT][/path]`` or a full URL, and its route (or None)."""
    url = destination if "://" in destination else f"http://{destination}"
    target = parse_target(url, None)
    return target, RouteTable(config.routes).match(target)


def describe_route(config: Config, route: RouteConfig) -> list[str]:
    spec = route.credential
    client = config.clients[spec.client]
    endpoint = client.token_url or f"discovered from issuer {client.issuer}"
    asked = {
        "scope": " ".join(spec.scope) or None,
        "audience": spec.audience,
        "resource": spec.resource,
        **dict(client.token_params),
        **dict(spec.token_params),
    }
    return [
        f"route     {route.name}",
        f"upstream  {route.upstream.base_url if route.upstream else '(the target itself)'}",
        f"client    {client.name} (client_id {client.client_id}, {client.auth_method.value})",
        f"endpoint  {endpoint}",
        "asks for  " + ("  ".join(f"{k}={v}" for k, v in asked.items() if v) or "(nothing)"),
    ]


def describe_token(grant: TokenGrant, *, show_token: bool, now: float | None = None) -> list[str]:
    now = time.time() if now is None else now
    lines = []
    if grant.expires_in_s is not None:
        lines.append(f"expires   in {grant.expires_in_s:.0f} s ({_date(now + grant.expires_in_s)})")
    else:
        lines.append("expires   (no expires_in; the proxy uses token_default_lifetime_s)")
    if grant.scope:
        lines.append(f"granted   scope={grant.scope}")
    claims = jwt_claims(grant.access_token)
    if claims is None:
        lines.append("claims    (opaque token, not a JWT)")
    else:
        for name in CLAIMS_SHOWN:
            if name in claims:
                value = claims[name]
                shown = (
                    _date(value)
                    if name in TIME_CLAIMS and isinstance(value, int | float)
                    else value
                )
                lines.append(f"claim     {name} = {shown}")
    lines.append(
        f"token     {grant.access_token}"
        if show_token
        else "token     (hidden; --show-token prints it)"
    )
    return lines


def _date(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
