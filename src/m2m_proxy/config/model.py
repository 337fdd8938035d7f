"""The validated, frozen runtime configuration. Pure values: no I/O, no pydantic.

Everything here is built by :func:`m2m_proxy.config.loader.load_config` from a routes
file that passed every check, so consumers may trust each field.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from m2m_proxy.authority import effective_port


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret value whose repr and str never show it."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


class AuthMethod(StrEnum):
    CLIENT_SECRET_BASIC = "client_secret_basic"
    CLIENT_SECRET_POST = "client_secret_post"
    CLIENT_SECRET_JWT = "client_secret_jwt"
    PRIVATE_KEY_JWT = "private_key_jwt"
    TLS_CLIENT_AUTH = "tls_client_auth"
    SELF_SIGNED_TLS_CLIENT_AUTH = "self_signed_tls_client_auth"

    @property
    def uses_certificate(self) -> bool:
        """RFC 8705 §2: the client authenticates with its TLS certificate."""
        return self in (AuthMethod.TLS_CLIENT_AUTH, AuthMethod.SELF_SIGNED_TLS_CLIENT_AUTH)


class HttpsMode(StrEnum):
    """What CONNECT to a routed host gets."""

    INTERCEPT = "intercept"
    TUNNEL = "tunnel"


class Unmatched(StrEnum):
    DENY = "deny"
    PASSTHROUGH = "passthrough"


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Origin:
    """scheme://host:port of an upstream; ``port`` is always explicit here."""

    scheme: str
    host: str
    port: int
    authority: str = field(init=False)
    """Host header value: the port only when it is not the scheme's default."""
    base_url: str = field(init=False)
    """scheme://host:port, to which the request's path and query are appended."""

    def __post_init__(self) -> None:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = effective_port(self.scheme, None)
        authority = host if self.port == default else f"{host}:{self.port}"
        object.__setattr__(self, "authority", authority)
        object.__setattr__(self, "base_url", f"{self.scheme}://{host}:{self.port}")


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """Who may use a route. None for a part means "anyone" / "no login"."""

    allow_from: tuple[Network, ...] | None = None
    allow_users: frozenset[str] | None = None

    @property
    def is_open(self) -> bool:
        return self.allow_from is None and self.allow_users is None


@dataclass(frozen=True, slots=True)
class ProxySettings:
    listen: Address
    admin_listen: Address
    unmatched: Unmatched
    name: str
    connect_timeout_s: float
    idle_timeout_s: float
    replay_body_limit_bytes: int
    token_skew_s: float
    token_default_lifetime_s: float
    token_timeout_s: float
    token_retries: int
    token_failure_hold_s: float
    token_failure_hold_max_s: float
    log_level: str
    shutdown_grace_s: float
    credential_files_check_s: float = 10.0
    ca_cert_file: str | None = None
    ca_key_file: str | None = None
    transparent: bool = False
    connect_ports: frozenset[int] = frozenset({443})
    tunnel_idle_timeout_s: float = 300.0
    tls_handshake_timeout_s: float = 10.0
    max_connections: int = 10000
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    client_idle_timeout_s: float = 60.0
    max_uri_bytes: int = 8190
    max_header_bytes: int = 8190
    max_header_count: int = 100
    max_body_bytes: int | None = 104_857_600
    users: Mapping[str, Secret] = field(default_factory=dict)
    access: AccessPolicy = AccessPolicy()
    """The default for routes (and for unmatched passthrough)."""
    allow_destinations: tuple[Network, ...] = ()
    allow_destination_hosts: frozenset[str] = frozenset()
    upstream_client: Literal["lean", "aiohttp"] = "lean"
    """lean: m2m_proxy.upstream's pool; aiohttp: aiohttp ClientSessions."""

    @property
    def intercepts(self) -> bool:
        """An interception CA is configured."""
        return self.ca_cert_file is not None


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private key for ``private_key_jwt``: PEM text (hidden), its JWS alg, its kid."""

    pem: Secret
    alg: str
    key_id: str | None = None
    file: str | None = None
    """Where ``pem`` was read from; re-read when it changes."""


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """A TLS client certificate (RFC 8705): PEM files, read when a TLS context is built."""

    cert_file: str
    key_file: str


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """One OAuth2 client (one identity) and how it authenticates to its token endpoint."""

    name: str
    token_url: str | None
    client_id: str
    client_secret: Secret | None
    auth_method: AuthMethod
    token_params: tuple[tuple[str, str], ...] = ()
    issuer: str | None = None
    """Set instead of ``token_url``: the token endpoint comes from discovery."""
    signing_key: SigningKey | None = None
    """``private_key_jwt`` only."""
    assertion_file: str | None = None
    """``private_key_jwt`` only, instead of ``signing_key``: read per token request."""
    fallback_secrets: tuple[Secret, ...] = ()
    """During a rotation: more secrets, tried in order when the IdP says invalid_client."""
    prefetch: bool = False
    """Fetch this client's tokens at start; readiness waits for them."""
    assertion_typ: str = "JWT"
    """The ``typ`` header of client assertions (some IdPs want another, e.g.
    ``client-authentication+jwt``)."""
    secret_files: tuple[str, ...] = ()
    """When the secrets came from files: the file of each of (client_secret,
    *fallback_secrets), re-read when it changes."""
    certificate: ClientCertificate | None = None
    """Presented to the token endpoint (and to upstreams of routes that ask for it)."""
    ca_file: str | None = None
    """CA bundle trusted for the token endpoint, in addition to the system store."""

    @property
    def files(self) -> tuple[str, ...]:
        """Every file this client's credentials come from (watched for changes)."""
        files = list(self.secret_files)
        if self.signing_key is not None and self.signing_key.file is not None:
            files.append(self.signing_key.file)
        if self.certificate is not None:
            files += (self.certificate.cert_file, self.certificate.key_file)
        return tuple(files)

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every secret value of this client, for log redaction."""
        values = (
            self.client_secret,
            *self.fallback_secrets,
            self.signing_key.pem if self.signing_key else None,
        )
        return tuple(v.value for v in values if v is not None)


@dataclass(frozen=True, slots=True)
class CredentialSpec:
    """What a token is requested for; routes with equal specs share one cached token."""

    client: str
    scope: tuple[str, ...] = ()
    audience: str | None = None
    resource: str | None = None
    token_params: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """A destination pattern and the credential it gets.

    ``host`` is normalised (lower case, no trailing dot); a wildcard keeps its ``*.``.
    ``port`` None means the scheme's default port. ``path_prefix`` is "" or starts with "/".
    """

    name: str
    host: str
    port: int | None
    path_prefix: str
    credential: CredentialSpec
    upstream: Origin | None = None
    ca_file: str | None = None
    """CA bundle trusted for this route's https upstream, besides the system store."""
    client_certificate: bool = False
    """Present the client's TLS certificate upstream (certificate-bound tokens, RFC 8705 §3)."""
    https: HttpsMode = HttpsMode.INTERCEPT
    """What CONNECT to this host gets (intercept needs the proxy's interception CA)."""
    access: AccessPolicy | None = None
    """None: the proxy's default (``proxy.allow_from`` / ``allow_users``)."""
    max_body_bytes: int | None = None
    """None: the proxy's ``max_body_bytes``."""
    upgrades: frozenset[str] = frozenset()
    """Lower-case protocol names a client may switch to with ``Upgrade`` (never h2c)."""

    @property
    def is_wildcard(self) -> bool:
        return self.host.startswith("*.")


@dataclass(frozen=True, slots=True)
class Config:
    source: str
    proxy: ProxySettings
    clients: Mapping[str, ClientConfig]
    routes: tuple[RouteConfig, ...]

    @property
    def open_listener(self) -> str | None:
        """Why the proxy listener is open to other machines with no access control,
        or None. ``check`` warns about it; ``run`` refuses it without an opt-in."""
        host = self.proxy.listen.host
        if host in ("127.0.0.1", "::1", "localhost") or host.startswith("127."):
            return None
        every_route_guarded = all(
            route.access is not None and not route.access.is_open for route in self.routes
        )
        if not self.proxy.access.is_open or (
            every_route_guarded and self.proxy.unmatched is Unmatched.DENY
        ):
            return None
        return (
            f"proxy.listen binds {self.proxy.listen}, reachable from other machines, and "
            "nothing limits who may spend the credentials; set proxy.allow_from (or "
            "allow_users), or start with --allow-open-listener if a firewall or network "
            "policy does it"
        )
