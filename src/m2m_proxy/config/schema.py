"""The routes file's shape as pydantic models: types, defaults, unknown keys.

This layer only checks shape. Cross-field rules (client references, URLs, files,
wildcards) live in :mod:`m2m_proxy.config.loader`, which also turns these models
into the frozen runtime values of :mod:`m2m_proxy.config.model`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UserSection(_Section):
    password_file: str = Field(description="A file holding the user's password.")


class ProxySection(_Section):
    listen: str | int = Field("127.0.0.1:8080", description="Proxy listener, host:port.")
    admin_listen: str | int = Field(
        "127.0.0.1:9901", description="Admin listener (/healthz, /readyz), host:port."
    )
    unmatched: Literal["deny", "passthrough"] = Field(
        "deny", description="Requests that match no route: deny (403) or forward with no token."
    )
    name: str = Field(
        "m2m-proxy",
        pattern=r"^[A-Za-z0-9._-]{1,64}$",
        description="This proxy's name in Via and Proxy-Status headers.",
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="Upstream TCP+TLS connect timeout.")
    idle_timeout_s: float = Field(
        60.0, gt=0, description="Longest silence while reading from the upstream."
    )
    upstream_client: Literal["lean", "aiohttp"] = Field(
        "lean",
        description="The HTTP/1.1 client for upstreams: lean (m2m-proxy's own keep-alive "
        "pool on llhttp) or aiohttp (aiohttp's ClientSession).",
    )
    replay_body_limit_bytes: int = Field(
        1_048_576,
        ge=0,
        description="Request bodies up to this size are buffered so a 401 can be replayed.",
    )
    token_skew_s: float = Field(
        60.0, ge=0, description="Renew tokens this long before expiry (at most half a lifetime)."
    )
    token_default_lifetime_s: float = Field(
        300.0, gt=0, description="Lifetime assumed when the token response has no expires_in."
    )
    token_timeout_s: float = Field(10.0, gt=0, description="Timeout of one token request.")
    token_retries: int = Field(
        2, ge=0, le=10, description="Retries of a token request on network errors, 5xx and 429."
    )
    token_failure_hold_s: float = Field(
        1.0,
        ge=0,
        description="After a failed token fetch, no new fetch for this long; doubles with "
        "each failure in a row (jittered), up to token_failure_hold_max_s.",
    )
    token_failure_hold_max_s: float = Field(
        30.0, ge=0, description="Longest wait between token fetches while the IdP fails."
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    shutdown_grace_s: float = Field(
        10.0, ge=0, description="On SIGTERM, time given to in-flight requests."
    )
    ca_cert_file: str | None = Field(
        None,
        description="Interception CA certificate (from `m2m-proxy ca init`): with it, CONNECT "
        "to a routed host is intercepted so the token can be added inside https.",
    )
    ca_key_file: str | None = Field(
        None, description="The interception CA's private key; must be mode 0600 or stricter."
    )
    transparent: bool = Field(
        False,
        description="Also accept redirected traffic: a connection that starts with a TLS "
        "ClientHello is routed by its SNI (port 443).",
    )
    connect_ports: list[int] = Field(
        default_factory=lambda: [443],
        description="Ports that CONNECT may reach on hosts no route names (with unmatched: "
        "passthrough); a routed host's port is always allowed.",
    )
    tunnel_idle_timeout_s: float = Field(
        300.0, gt=0, description="A blind tunnel with no bytes either way for this long is closed."
    )
    tls_handshake_timeout_s: float = Field(
        10.0, gt=0, description="Longest TLS handshake with a client inside CONNECT."
    )
    max_connections: int = Field(
        10000, ge=1, description="Client connections open at once; more are closed at accept."
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="From a request's first byte to its last header (slowloris)."
    )
    body_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Longest wait for the next bytes of an unfinished request body (else 408).",
    )
    client_idle_timeout_s: float = Field(
        60.0, gt=0, description="A keep-alive client connection idle this long is closed."
    )
    max_uri_bytes: int = Field(8190, ge=256, description="Longest request line (else 414).")
    max_header_bytes: int = Field(8190, ge=256, description="Longest header line (else 431).")
    max_header_count: int = Field(100, ge=8, description="Most header lines (else 431).")
    max_body_bytes: int | None = Field(
        104_857_600,
        ge=0,
        description="Largest request body (else 413); a route's max_body_bytes replaces it; "
        "null: no limit.",
    )
    users: dict[str, str | UserSection] = Field(
        default_factory=dict,
        description="Proxy users: name → password (a ${ENV} reference) or "
        "{password_file: PATH}; clients log in with Proxy-Authorization: Basic.",
    )
    allow_from: list[str] | None = Field(
        None,
        description="Source addresses (CIDRs) that may use the proxy; a route's own "
        "allow_from replaces it. Unset: any address that reaches the listener.",
    )
    allow_users: list[str] | None = Field(
        None,
        description="Users (from proxy.users) that may use the proxy; a route's own "
        "allow_users replaces it. Unset: no login needed.",
    )
    allow_destinations: list[str] = Field(
        default_factory=list,
        description="Private, loopback or link-local destinations (CIDRs or exact host "
        "names) that passthrough requests and tunnels may reach; routes need none.",
    )
    credential_files_check_s: float = Field(
        10.0,
        gt=0,
        description="How often secret, key and certificate files are checked for changes "
        "(they are also checked before every token request).",
    )


class ClientSection(_Section):
    token_url: str | None = Field(
        None, description="The IdP's token endpoint (https, or http on loopback)."
    )
    issuer: str | None = Field(
        None,
        description="Instead of token_url: the IdP's issuer; the token endpoint is "
        "discovered (OpenID Connect Discovery, then RFC 8414).",
    )
    client_id: str = Field(min_length=1)
    client_secret: str | list[str] | None = Field(
        None,
        description="The secret; use ${ENV} references. A list during a rotation: on "
        "invalid_client the next one is tried, and the one that works is kept.",
    )
    client_secret_file: str | list[str] | None = Field(
        None, description="A file holding the secret (a list during a rotation)."
    )
    auth_method: Literal[
        "client_secret_basic",
        "client_secret_post",
        "client_secret_jwt",
        "private_key_jwt",
        "tls_client_auth",
        "self_signed_tls_client_auth",
    ] = "client_secret_basic"
    client_cert_file: str | None = Field(
        None,
        description="PEM certificate (chain) presented to the token endpoint: needed by "
        "tls_client_auth and self_signed_tls_client_auth, optional otherwise "
        "(certificate-bound tokens).",
    )
    client_key_file: str | None = Field(None, description="PEM private key of client_cert_file.")
    ca_file: str | None = Field(
        None,
        description="PEM CA bundle trusted for the token endpoint and discovery, in "
        "addition to the system store.",
    )
    private_key_file: str | None = Field(
        None, description="private_key_jwt: PEM file of the RSA or EC P-256 private key."
    )
    key_id: str | None = Field(None, description="private_key_jwt: the key's kid header.")
    client_assertion_file: str | None = Field(
        None,
        description="private_key_jwt: instead of private_key_file, a file holding an "
        "assertion made by someone else (a Kubernetes service-account token, a SPIFFE "
        "JWT-SVID), read again for every token request.",
    )
    signing_alg: Literal["RS256", "PS256", "ES256"] | None = Field(
        None, description="private_key_jwt: RS256 (default for RSA), PS256, or ES256 (EC)."
    )
    prefetch: bool = Field(
        False, description="Fetch this client's tokens at start; /readyz waits for them."
    )
    assertion_typ: str = Field("JWT", min_length=1, description="typ header of client assertions.")
    token_params: dict[str, str] = Field(
        default_factory=dict, description="Extra form parameters for every token request."
    )


class RouteSection(_Section):
    name: str | None = Field(None, description="Name in logs; default: host and path prefix.")
    host: str = Field(description="Exact host or *.suffix wildcard, optional :port.")
    path_prefix: str = Field("", description="Match only paths under this prefix.")
    client: str = Field(description="Name of an entry under clients.")
    scope: str | list[str] | None = None
    audience: str | None = None
    resource: str | None = None
    token_params: dict[str, str] = Field(default_factory=dict)
    upstream: str | None = Field(
        None, description="scheme://host[:port] to send to instead (TLS origination, rewrite)."
    )
    ca_file: str | None = Field(
        None,
        description="PEM CA bundle trusted for this route's https upstream, in addition "
        "to the system store.",
    )
    allow_from: list[str] | None = Field(
        None, description="Source CIDRs that may use this route (replaces proxy.allow_from)."
    )
    max_body_bytes: int | None = Field(
        None, ge=0, description="Largest request body for this route (replaces the proxy's)."
    )
    allow_users: list[str] | None = Field(
        None, description="Users that may use this route (replaces proxy.allow_users)."
    )
    https: Literal["intercept", "tunnel"] | None = Field(
        None,
        description="CONNECT to this host: intercept (terminate TLS with a minted "
        "certificate and add the token; the default when proxy.ca_cert_file is set) or "
        "tunnel (relay bytes blindly; no token).",
    )
    client_certificate: bool = Field(
        False,
        description="Present the client's client_cert_file to the https upstream, so "
        "certificate-bound tokens (RFC 8705 cnf.x5t#S256) are accepted.",
    )
    upgrades: list[str] = Field(
        default_factory=list,
        description="Protocols a client may switch to with Upgrade on this route (e.g. "
        "websocket; case-insensitive; never h2c). Empty: Upgrade is removed.",
    )


class RoutesFile(_Section):
    proxy: ProxySection = Field(default_factory=ProxySection)
    clients: dict[str, ClientSection] = Field(default_factory=dict)
    routes: list[RouteSection] = Field(default_factory=list)


def json_schema() -> dict[str, object]:
    """The JSON Schema of the routes file (``m2m-proxy schema``), for editors and CI."""
    schema = RoutesFile.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "m2m-proxy routes file"
    schema["description"] = (
        "Shape and defaults of the routes file; `m2m-proxy check` also runs the "
        "cross-field rules (client references, files, URLs, wildcards)."
    )
    return schema
