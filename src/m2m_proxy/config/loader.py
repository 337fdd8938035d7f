"""Load a routes file: read, parse, check everything, build the frozen :class:`Config`.

Every problem found is collected and raised together as :class:`ConfigError`, each
one as ``FILE:LINE:COL: field.path: what is wrong; how to fix``.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path as FsPath
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from m2m_proxy.authority import (
    AuthorityError,
    split_authority,
)
from m2m_proxy.config.client_checks import ClientChecks
from m2m_proxy.config.model import (
    Address,
    ClientConfig,
    Config,
    Network,
    ProxySettings,
    Secret,
    Unmatched,
)
from m2m_proxy.config.route_checks import RouteChecks
from m2m_proxy.config.schema import ClientSection, ProxySection, RouteSection, RoutesFile
from m2m_proxy.config.source import Path, Problem, parse_yaml
from m2m_proxy.interception_ca import CAError, load_ca

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
    return _apply_environment(config, environ, file)


class _Checker(ClientChecks, RouteChecks):
    """Cross-field checks and construction; records problems with their marks."""

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
        users = set(proxy.users) if proxy is not None else set()
        routes = self._routes(sections, set(client_data), users)
        self._check_client_certificates(sections, client_data)
        if proxy is not None:
            self._check_https_modes(sections, proxy)
            self._check_upgrades(sections, proxy)
        if proxy is None:
            return None
        return Config(source=self._file, proxy=proxy, clients=clients, routes=routes)

    def _check_client_certificates(
        self, sections: list[RouteSection | None], client_data: dict[str, Any]
    ) -> None:
        """``client_certificate: true`` needs a client that has a certificate."""
        for index, section in enumerate(sections):
            if section is None or not section.client_certificate:
                continue
            client = client_data.get(section.client)
            if isinstance(client, dict) and client.get("client_cert_file") is None:
                self.problem(
                    ("routes", index, "client_certificate"),
                    f"client '{section.client}' has no client_cert_file to present; "
                    "add client_cert_file and client_key_file to it, or remove this",
                )

    def _check_https_modes(self, sections: list[RouteSection | None], proxy: ProxySettings) -> None:
        """``https: intercept`` needs the interception CA."""
        for index, section in enumerate(sections):
            if section is not None and section.https == "intercept" and not proxy.intercepts:
                self.problem(
                    ("routes", index, "https"),
                    "intercept needs an interception CA; create one with `m2m-proxy ca init "
                    "--dir DIR` and set proxy.ca_cert_file and proxy.ca_key_file",
                )

    def _check_upgrades(self, sections: list[RouteSection | None], proxy: ProxySettings) -> None:
        """``upgrades`` needs the lean upstream client (it hands over the connection)."""
        if proxy.upstream_client == "lean":
            return
        for index, section in enumerate(sections):
            if section is not None and section.upgrades:
                self.problem(
                    ("routes", index, "upgrades"),
                    f"needs proxy.upstream_client: lean (the {proxy.upstream_client} client "
                    "cannot hand over the connection after 101); remove it or use lean",
                )

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
        ca_files = self._interception_ca(section)
        users = self._users(section)
        access = self._access_policy(("proxy",), section.allow_from, section.allow_users, users)
        destinations, destination_hosts = self._destinations(section.allow_destinations)
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
            credential_files_check_s=section.credential_files_check_s,
            ca_cert_file=ca_files[0] if ca_files else None,
            ca_key_file=ca_files[1] if ca_files else None,
            transparent=section.transparent,
            connect_ports=frozenset(self._connect_ports(section.connect_ports)),
            tunnel_idle_timeout_s=section.tunnel_idle_timeout_s,
            tls_handshake_timeout_s=section.tls_handshake_timeout_s,
            max_connections=section.max_connections,
            header_timeout_s=section.header_timeout_s,
            body_timeout_s=section.body_timeout_s,
            client_idle_timeout_s=section.client_idle_timeout_s,
            max_uri_bytes=section.max_uri_bytes,
            max_header_bytes=section.max_header_bytes,
            max_header_count=section.max_header_count,
            max_body_bytes=section.max_body_bytes,
            users=users,
            access=access,
            allow_destinations=destinations,
            allow_destination_hosts=destination_hosts,
            upstream_client=section.upstream_client,
        )

    def _users(self, section: ProxySection) -> dict[str, Secret]:
        users: dict[str, Secret] = {}
        for name, value in section.users.items():
            path: Path = ("proxy", "users", name)
            if not name or ":" in name:
                self.problem(path, "a user name must be non-empty and have no ':'", key=True)
                continue
            if isinstance(value, str):
                if not value:
                    self.problem(path, "the password is empty; set it, e.g. from ${ENV}")
                    continue
                users[name] = Secret(value)
                continue
            secret = self._read_secret_file((*path, "password_file"), value.password_file)
            if secret is not None:
                users[name] = secret
        return users

    def _destinations(self, values: list[str]) -> tuple[tuple[Network, ...], frozenset[str]]:
        networks, hosts = [], set()
        for i, value in enumerate(values):
            try:
                networks.append(ipaddress.ip_network(value.strip(), strict=False))
            except ValueError:
                try:
                    host, port = split_authority(value)
                except AuthorityError as exc:
                    self.problem(
                        ("proxy", "allow_destinations", i), f"{exc}; write a CIDR or a host"
                    )
                    continue
                if port is not None:
                    self.problem(("proxy", "allow_destinations", i), "give a host or CIDR, no port")
                hosts.add(host)
        return tuple(networks), frozenset(hosts)

    def _interception_ca(self, section: ProxySection) -> tuple[str, str] | None:
        """Both CA files or neither; loadable, and the key not readable by others."""
        cert, key = section.ca_cert_file, section.ca_key_file
        if cert is None and key is None:
            return None
        if cert is None or key is None:
            missing = "ca_cert_file" if cert is None else "ca_key_file"
            self.problem(
                ("proxy",),
                f"set {missing} too (the interception CA needs both); create them with "
                "`m2m-proxy ca init --dir DIR`",
            )
            return None
        try:
            load_ca(cert, key)
        except CAError as exc:
            field = "ca_key_file" if f"'{key}'" in str(exc) else "ca_cert_file"
            self.problem(("proxy", field), str(exc))
            return None
        return cert, key

    def _connect_ports(self, ports: list[int]) -> list[int]:
        for i, port in enumerate(ports):
            if not 1 <= port <= 65535:
                self.problem(("proxy", "connect_ports", i), f"{port} is not a TCP port (1-65535)")
        return [p for p in ports if 1 <= p <= 65535]

    def _address(self, path: Path, value: str | int) -> Address:
        try:
            return parse_address(value)
        except ValueError as exc:
            self.problem(path, str(exc))
            return Address("127.0.0.1", 0)


def parse_address(value: str | int) -> Address:
    """``host:port``, or a bare port on 127.0.0.1; ValueError says how to write it."""
    text = f"127.0.0.1:{value}" if isinstance(value, int) or value.isdecimal() else value
    try:
        host, port = split_authority(text, allow_zero=True)
    except AuthorityError as exc:
        raise ValueError(f"{exc}; write host:port, e.g. 127.0.0.1:8080") from None
    if port is None:
        raise ValueError(f"'{text}' has no port; write host:port, e.g. 127.0.0.1:8080")
    return Address(host, port)


ENVIRONMENT_OVERRIDES = {
    "M2M_PROXY_LISTEN": "listen",
    "M2M_PROXY_ADMIN_LISTEN": "admin_listen",
    "M2M_PROXY_LOG_LEVEL": "log_level",
}
"""Environment variables that override proxy settings of the file (12-factor)."""
LOG_LEVELS = ("debug", "info", "warning", "error")


def _apply_environment(config: Config, environ: Mapping[str, str], file: str) -> Config:
    changes: dict[str, Any] = {}
    problems = []
    for variable, field in ENVIRONMENT_OVERRIDES.items():
        value = environ.get(variable, "").strip()
        if not value:
            continue
        try:
            if field == "log_level":
                if value.lower() not in LOG_LEVELS:
                    raise ValueError(f"'{value}' is not one of {', '.join(LOG_LEVELS)}")
                changes[field] = value.lower()
            else:
                changes[field] = parse_address(value)
        except ValueError as exc:
            problems.append(Problem(file, None, f"{variable} (environment)", str(exc)))
    if problems:
        raise ConfigError(problems)
    proxy = replace(config.proxy, **changes)
    if proxy.listen == proxy.admin_listen and proxy.listen.port != 0:
        raise ConfigError(
            [
                Problem(
                    file,
                    None,
                    "proxy.admin_listen",
                    "must differ from proxy.listen "
                    "(after the M2M_PROXY_* environment overrides); pick another port",
                )
            ]
        )
    return replace(config, proxy=proxy)


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
