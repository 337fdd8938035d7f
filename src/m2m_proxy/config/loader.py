"""Load a routes file: read, parse, check everything, build the frozen :class:`Config`.

Every problem found is collected and raised together as :class:`ConfigError`, each
one as ``FILE:LINE:COL: field.path: what is wrong; how to fix``.
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Mapping
from pathlib import Path as FsPath
from typing import Any, TypeVar
from urllib.parse import urlsplit

from publicsuffixlist import PublicSuffixList
from pydantic import BaseModel, ValidationError

from m2m_proxy.authority import (
    AuthorityError,
    effective_port,
    secure_or_loopback,
    split_authority,
)
from m2m_proxy.config.model import (
    Address,
    AuthMethod,
    ClientConfig,
    Config,
    CredentialSpec,
    Origin,
    ProxySettings,
    RouteConfig,
    Secret,
    SigningKey,
    Unmatched,
)
from m2m_proxy.config.schema import ClientSection, ProxySection, RouteSection, RoutesFile
from m2m_proxy.config.source import Path, Problem, SourceDocument, format_path, parse_yaml
from m2m_proxy.keys import SigningKeyError, check_alg

# Form parameters the proxy sets itself; token_params may not override them.
RESERVED_TOKEN_PARAMS = frozenset(
    {
        "grant_type",
        "client_id",
        "client_secret",
        "scope",
        "audience",
        "resource",
        "client_assertion",
        "client_assertion_type",
    }
)


_M = TypeVar("_M", bound=BaseModel)


class ConfigError(Exception):
    """The routes file has problems; ``problems`` lists every one."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate ``path``; return the config or raise ConfigError."""
    file = os.fspath(path)
    try:
        text = FsPath(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            [Problem(file, None, "", f"cannot read the routes file: {reason}; check the path")]
        ) from None
    return parse_config(text, file, os.environ if environ is None else environ)


def parse_config(text: str, file: str, environ: Mapping[str, str]) -> Config:
    doc = parse_yaml(text, file, environ)
    if doc.problems and doc.data is None:
        raise ConfigError(doc.problems)
    if not isinstance(doc.data, dict):
        raise ConfigError(
            [
                Problem(
                    file,
                    doc.mark_for(()),
                    "",
                    "the file must be a mapping with 'proxy', 'clients' and 'routes' keys",
                )
            ]
        )
    checker = _Checker(file, doc)
    config = checker.build(doc.data)
    problems = sorted(
        doc.problems + checker.problems,
        key=lambda p: (p.mark.line, p.mark.column) if p.mark else (0, 0),
    )
    if problems or config is None:
        raise ConfigError(problems)
    return config


class _Checker:
    """Cross-field checks and construction; records problems with their marks."""

    def __init__(self, file: str, doc: SourceDocument) -> None:
        self._file = file
        self._doc = doc
        self.problems: list[Problem] = []

    def problem(self, path: Path, message: str, *, key: bool = False) -> None:
        shown = format_path(path)
        if any(p.path == shown for p in (*self._doc.problems, *self.problems)):
            return  # one problem per field: the first is the cause, later ones its echo
        mark = self._doc.mark_for(path, key=key)
        self.problems.append(Problem(self._file, mark, shown, message))

    def validate(self, model: type[_M], data: Any, base: Path) -> _M | None:
        """Validate one section; record its errors with paths from the file's root."""
        try:
            return model.model_validate({} if data is None else data)
        except ValidationError as exc:
            self._add_pydantic(exc, data, base)
            return None

    def _add_pydantic(self, exc: ValidationError, data: Any, base: Path) -> None:
        for err in exc.errors():
            path: Path = (*base, *_data_path(data, err["loc"]))
            if err["type"] == "extra_forbidden":
                self.problem(path, _unknown_key_message(path), key=True)
            elif err["type"] == "missing":
                self.problem(path, "required field is missing; add it")
            else:
                self.problem(path, f"{err['msg'][:1].lower()}{err['msg'][1:]}; fix the value")

    def build(self, data: dict[str, Any]) -> Config | None:
        """Check each section on its own so one bad entry does not hide the others."""
        for key in data:
            if key not in RoutesFile.model_fields:
                self.problem((key,), _unknown_key_message((key,)), key=True)
        proxy_section = self.validate(ProxySection, data.get("proxy"), ("proxy",))
        proxy = self._proxy(proxy_section) if proxy_section else None
        client_data = self._mapping_of(data, "clients")
        clients: dict[str, ClientConfig] = {}
        for name, item in client_data.items():
            section = self.validate(ClientSection, item, ("clients", name))
            if section is None:
                self._check_raw_client(name, item)
                continue
            client = self._client(name, section)
            if client is not None:
                clients[name] = client
        route_data = data.get("routes") or []
        if not isinstance(route_data, list):
            self.problem(("routes",), "must be a list of routes (each item starts with '- ')")
            route_data = []
        sections = [
            self.validate(RouteSection, item, ("routes", i)) for i, item in enumerate(route_data)
        ]
        for index, (route_section, item) in enumerate(zip(sections, route_data, strict=True)):
            if route_section is None:
                self._check_raw_route(index, item, set(client_data))
        routes = self._routes(sections, set(client_data))
        if proxy is None:
            return None
        return Config(source=self._file, proxy=proxy, clients=clients, routes=routes)

    def _mapping_of(self, data: dict[str, Any], key: str) -> dict[str, Any]:
        value = data.get(key) or {}
        if not isinstance(value, dict):
            self.problem((key,), "must be a mapping of names to settings")
            return {}
        return value

    def _proxy(self, section: ProxySection) -> ProxySettings:
        listen = self._address(("proxy", "listen"), section.listen)
        admin = self._address(("proxy", "admin_listen"), section.admin_listen)
        if listen == admin and listen.port != 0:
            self.problem(
                ("proxy", "admin_listen"),
                "must differ from proxy.listen; pick another port, e.g. 127.0.0.1:9901",
            )
        return ProxySettings(
            listen=listen,
            admin_listen=admin,
            unmatched=Unmatched(section.unmatched),
            name=section.name,
            connect_timeout_s=section.connect_timeout_s,
            idle_timeout_s=section.idle_timeout_s,
            replay_body_limit_bytes=section.replay_body_limit_bytes,
            token_skew_s=section.token_skew_s,
            token_default_lifetime_s=section.token_default_lifetime_s,
            token_timeout_s=section.token_timeout_s,
            token_retries=section.token_retries,
            token_failure_hold_s=section.token_failure_hold_s,
            token_failure_hold_max_s=section.token_failure_hold_max_s,
            log_level=section.log_level,
            shutdown_grace_s=section.shutdown_grace_s,
        )

    def _address(self, path: Path, value: str | int) -> Address:
        text = f"127.0.0.1:{value}" if isinstance(value, int) or value.isdecimal() else value
        try:
            host, port = split_authority(text, allow_zero=True)
        except AuthorityError as exc:
            self.problem(path, f"{exc}; write host:port, e.g. 127.0.0.1:8080")
            return Address("127.0.0.1", 0)
        if port is None:
            self.problem(path, f"'{text}' has no port; write host:port, e.g. 127.0.0.1:8080")
            return Address(host, 0)
        return Address(host, port)

    def _client(self, name: str, section: ClientSection) -> ClientConfig | None:
        base: Path = ("clients", name)
        if (section.token_url is None) == (section.issuer is None):
            self.problem(
                base,
                "set exactly one of token_url or issuer (the token endpoint is then discovered)",
            )
        if section.token_url is not None:
            self._check_token_url((*base, "token_url"), section.token_url)
        if section.issuer is not None:
            self._check_token_url((*base, "issuer"), section.issuer)
        method = AuthMethod(section.auth_method)
        params = self._token_params((*base, "token_params"), section.token_params)
        fallbacks: tuple[Secret, ...] = ()
        assertion_file = None
        if method is AuthMethod.PRIVATE_KEY_JWT and section.client_assertion_file is not None:
            secret, key = None, None
            assertion_file = self._assertion_file(base, section)
            if assertion_file is None:
                return None
        elif method is AuthMethod.PRIVATE_KEY_JWT:
            secret = None
            key = self._signing_key(base, section)
            if key is None:
                return None
        else:
            key = None
            for field in ("private_key_file", "key_id", "signing_alg", "client_assertion_file"):
                if getattr(section, field) is not None:
                    self.problem(
                        (*base, field),
                        f"is only used with auth_method: "
                        f"private_key_jwt, not {method.value}; remove it",
                        key=True,
                    )
            secrets = self._secrets(base, section)
            if secrets is None:
                return None
            secret, fallbacks = secrets[0], tuple(secrets[1:])
        return ClientConfig(
            name=name,
            token_url=section.token_url,
            client_id=section.client_id,
            client_secret=secret,
            fallback_secrets=fallbacks,
            auth_method=method,
            token_params=params,
            issuer=section.issuer,
            signing_key=key,
            assertion_file=assertion_file,
            prefetch=section.prefetch,
            assertion_typ=section.assertion_typ,
        )

    def _assertion_file(self, base: Path, section: ClientSection) -> str | None:
        """An externally made assertion: checked readable now, read again per request."""
        for field in (
            "client_secret",
            "client_secret_file",
            "private_key_file",
            "key_id",
            "signing_alg",
        ):
            if getattr(section, field) is not None:
                self.problem(
                    (*base, field),
                    "is not used with client_assertion_file (the "
                    "assertion is already signed); remove it",
                    key=True,
                )
        path = (*base, "client_assertion_file")
        if self._read_secret_file(path, section.client_assertion_file) is None:
            return None
        return section.client_assertion_file

    def _signing_key(self, base: Path, section: ClientSection) -> SigningKey | None:
        for field in ("client_secret", "client_secret_file"):
            if getattr(section, field) is not None:
                self.problem(
                    (*base, field),
                    "private_key_jwt signs with private_key_file and sends no secret; remove it",
                    key=True,
                )
        if section.private_key_file is None:
            self.problem(
                base,
                "private_key_jwt needs private_key_file: a PEM file with the "
                "client's RSA or EC P-256 private key",
            )
            return None
        path = (*base, "private_key_file")
        pem = self._read_secret_file(path, section.private_key_file)
        if pem is None:
            return None
        try:
            alg = check_alg(pem.value, section.signing_alg)
        except SigningKeyError as exc:
            self.problem(path, f"{exc}; give an unencrypted PEM private key (RSA or EC P-256)")
            return None
        return SigningKey(pem=pem, alg=alg, key_id=section.key_id)

    def _check_raw_client(self, name: str, item: Any) -> None:
        """Checks that do not need a valid section, so one bad field hides nothing."""
        if not isinstance(item, dict):
            return
        base: Path = ("clients", name)
        for field in ("token_url", "issuer"):
            if isinstance(item.get(field), str):
                self._check_token_url((*base, field), item[field])
        if isinstance(item.get("client_secret_file"), str):
            self._read_secret_file((*base, "client_secret_file"), item["client_secret_file"])
        if isinstance(item.get("token_params"), dict):
            self._token_params((*base, "token_params"), item["token_params"])

    def _check_raw_route(self, index: int, item: Any, clients: set[str]) -> None:
        """A route that failed validation still gets its client and host checked."""
        if not isinstance(item, dict):
            return
        base: Path = ("routes", index)
        client = item.get("client")
        if isinstance(client, str) and client not in clients:
            self.problem((*base, "client"), _unknown_client_message(client, clients))
        if isinstance(item.get("host"), str):
            self._host_pattern((*base, "host"), item["host"])

    def _check_token_url(self, path: Path, url: str) -> None:
        try:
            parts = urlsplit(url)
            _ = parts.port  # raises ValueError for a port out of range or not a number
        except ValueError as exc:
            self.problem(
                path,
                f"'{url}' is not a valid URL ({exc}); write e.g. "
                "https://idp.example.com/oauth2/token",
            )
            return
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.problem(
                path,
                f"'{url}' is not an http(s) URL; write e.g. https://idp.example.com/oauth2/token",
            )
            return
        if parts.username or parts.password or parts.fragment:
            self.problem(path, "must not carry user:password@ or a #fragment; remove them")
        if not secure_or_loopback(parts.scheme, parts.hostname):
            self.problem(
                path,
                "must be https (client secrets would travel in cleartext); "
                "plain http is only allowed on loopback",
            )

    def _secrets(self, base: Path, section: ClientSection) -> list[Secret] | None:
        """The client's secrets in order; more than one during a rotation."""
        if (section.client_secret is None) == (section.client_secret_file is None):
            self.problem(base, "set exactly one of client_secret or client_secret_file")
            return None
        if section.client_secret is not None:
            values = _as_list(section.client_secret)
            for i, value in enumerate(values):
                if not value:
                    path = (
                        (*base, "client_secret", i) if len(values) > 1 else (*base, "client_secret")
                    )
                    self.problem(path, "is empty; set it (e.g. from ${ENV})")
                    return None
            if not values:
                return self._no_secret(base, "client_secret")
            return [Secret(v) for v in values]
        files = _as_list(section.client_secret_file)
        secrets = [
            self._read_secret_file(
                (*base, "client_secret_file", i)
                if len(files) > 1
                else (*base, "client_secret_file"),
                file,
            )
            for i, file in enumerate(files)
        ]
        if not files:
            return self._no_secret(base, "client_secret_file")
        if any(s is None for s in secrets):
            return None
        return [s for s in secrets if s is not None]

    def _no_secret(self, base: Path, field: str) -> list[Secret] | None:
        self.problem((*base, field), "is an empty list; give one secret, or two during a rotation")
        return None

    def _read_secret_file(self, path: Path, file: str | None) -> Secret | None:
        try:
            value = FsPath(str(file)).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8"
            self.problem(
                path,
                f"cannot read '{file}': {reason}; check the path and that this user may read it",
            )
            return None
        if not value:
            self.problem(path, f"'{file}' is empty; put the secret in it")
            return None
        return Secret(value)

    def _token_params(self, path: Path, params: dict[str, str]) -> tuple[tuple[str, str], ...]:
        for name in params:
            if name in RESERVED_TOKEN_PARAMS:
                self.problem(
                    (*path, name),
                    "is set by the proxy itself; use the route's or "
                    "client's dedicated field instead",
                    key=True,
                )
        return tuple(sorted(params.items()))

    def _routes(
        self, sections: list[RouteSection | None], clients: set[str]
    ) -> tuple[RouteConfig, ...]:
        routes: list[RouteConfig] = []
        seen: dict[tuple[str, int | None, str], int] = {}
        names: dict[str, int] = {}
        for index, section in enumerate(sections):
            if section is None:
                continue
            route = self._route(("routes", index), section, clients)
            if route is None:
                continue
            key = (route.host, route.port, route.path_prefix)
            if key in seen:
                self.problem(
                    ("routes", index, "host"),
                    f"same host and path_prefix as "
                    f"routes[{seen[key]}]; merge the two or remove one",
                )
                continue
            if route.name in names:
                self.problem(
                    ("routes", index, "name"),
                    f"route name '{route.name}' is already used by routes[{names[route.name]}]; "
                    "give each route its own name",
                )
                continue
            seen[key] = index
            names[route.name] = index
            routes.append(route)
        return tuple(routes)

    def _route(self, base: Path, section: RouteSection, clients: set[str]) -> RouteConfig | None:
        pattern = self._host_pattern((*base, "host"), section.host)
        prefix = self._path_prefix((*base, "path_prefix"), section.path_prefix)
        upstream = self._upstream((*base, "upstream"), section.upstream)
        if section.client not in clients:
            self.problem((*base, "client"), _unknown_client_message(section.client, clients))
        scope = self._scope((*base, "scope"), section.scope)
        params = self._token_params((*base, "token_params"), section.token_params)
        if pattern is None or prefix is None or section.client not in clients:
            return None
        host, port = pattern
        credential = CredentialSpec(
            client=section.client,
            scope=scope,
            audience=section.audience or None,
            resource=section.resource or None,
            token_params=params,
        )
        shown = host if port is None else f"{host}:{port}"
        return RouteConfig(
            name=section.name or f"{shown}{prefix}",
            host=host,
            port=port,
            path_prefix=prefix,
            credential=credential,
            upstream=upstream,
        )

    def _host_pattern(self, path: Path, text: str) -> tuple[str, int | None] | None:
        wildcard = text.startswith("*.")
        if "*" in text[1:] or (text.startswith("*") and not wildcard):
            self.problem(path, "a wildcard may only be a leading '*.' label, e.g. *.example.com")
            return None
        try:
            host, port = split_authority(text[2:] if wildcard else text)
        except AuthorityError as exc:
            self.problem(path, f"{exc}; write a host like api.example.com or *.example.com")
            return None
        if wildcard and _public_suffixes().is_public(host):
            self.problem(
                path,
                f"wildcard '{text}' spans the public suffix '{host}' and would "
                "match other organisations' hosts; name a domain you control, "
                f"e.g. *.example.{host}",
            )
            return None
        return (f"*.{host}" if wildcard else host), port

    def _path_prefix(self, path: Path, prefix: str) -> str | None:
        if prefix and (not prefix.startswith("/") or "?" in prefix or "#" in prefix):
            self.problem(
                path,
                f"'{prefix}' must be a path starting with '/' and without '?' or '#', e.g. /v1",
            )
            return None
        segments = prefix.split("/")
        if "." in segments or ".." in segments:
            self.problem(path, "must not contain '.' or '..' segments; write the plain path")
            return None
        return prefix.rstrip("/")

    def _upstream(self, path: Path, url: str | None) -> Origin | None:
        if url is None:
            return None
        hint = "write scheme://host[:port], e.g. https://api.example.com"
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            self.problem(path, f"'{url}' is not a valid URL ({exc}); {hint}")
            return None
        if parts.scheme not in ("http", "https") or not parts.netloc:
            self.problem(path, f"'{url}' is not an http(s) URL; {hint}")
            return None
        if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
            self.problem(
                path, f"'{url}' must name only an origin (no path, query, user or fragment); {hint}"
            )
            return None
        try:
            host, port = split_authority(parts.netloc)
        except AuthorityError as exc:
            self.problem(path, f"{exc}; {hint}")
            return None
        return Origin(parts.scheme, host, effective_port(parts.scheme, port))

    def _scope(self, path: Path, scope: str | list[str] | None) -> tuple[str, ...]:
        if scope is None:
            return ()
        items = scope.split() if isinstance(scope, str) else scope
        for i, item in enumerate(items):
            if not item or any(c.isspace() or c in '"\\' or ord(c) < 0x21 for c in item):
                self.problem(
                    (*path, i),
                    f"scope '{item}' is not a valid scope token "
                    "(RFC 6749 §3.3); remove spaces and quotes",
                )
        return tuple(sorted(set(items)))


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _data_path(data: Any, loc: tuple[str | int, ...]) -> Path:
    """The part of a pydantic error location that exists in the data.

    pydantic appends union member names ("str", "list[str]") below a field; they are
    not keys of the file, so the path stops at the field itself.
    """
    path: list[str | int] = []
    current = data
    for part in loc:
        if isinstance(current, dict):
            path.append(part)
            if part not in current:
                break
            current = current[part]
        elif isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current):
            path.append(part)
            current = current[part]
        else:
            break
    return tuple(path)


@functools.cache
def _public_suffixes() -> PublicSuffixList:
    """The bundled Public Suffix List; unknown TLDs count as public."""
    return PublicSuffixList(accept_unknown=True)


def _unknown_key_message(path: Path) -> str:
    key = str(path[-1])
    fields = _fields_for(path[:-1])
    guess = difflib.get_close_matches(key, fields, n=1)
    hint = f"did you mean '{guess[0]}'?" if guess else f"known keys: {', '.join(sorted(fields))}"
    return f"unknown key '{key}'; {hint}"


def _fields_for(parent: Path) -> list[str]:
    model: Any = RoutesFile
    if parent[:1] == ("proxy",):
        model = ProxySection
    elif parent[:1] == ("clients",) and len(parent) == 2:
        model = ClientSection
    elif parent[:1] == ("routes",) and len(parent) == 2:
        model = RouteSection
    return list(model.model_fields)


def _unknown_client_message(name: str, clients: set[str]) -> str:
    guess = difflib.get_close_matches(name, sorted(clients), n=1)
    if guess:
        return f"unknown client '{name}'; did you mean '{guess[0]}'?"
    if clients:
        return f"unknown client '{name}'; define it under clients: ({', '.join(sorted(clients))})"
    return f"unknown client '{name}'; define it under the top-level 'clients:' section"
