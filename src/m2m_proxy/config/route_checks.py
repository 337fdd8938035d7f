"""Checks of the ``routes`` section: host patterns, prefixes, upstreams, client names."""

from __future__ import annotations

import difflib
import functools
import re
from typing import Any
from urllib.parse import urlsplit

from publicsuffixlist import PublicSuffixList

from m2m_proxy.authority import (
    AuthorityError,
    effective_port,
    split_authority,
)
from m2m_proxy.config.model import (
    CredentialSpec,
    HttpsMode,
    Origin,
    RouteConfig,
)
from m2m_proxy.config.report import Reporter
from m2m_proxy.config.schema import RouteSection
from m2m_proxy.config.source import Path

NEVER_UPGRADES = frozenset({"h2c", "h2", "http"})
"""Upgrades no route may allow: a switch to HTTP/2 (or another HTTP version)."""
_TOKEN = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")


class RouteChecks(Reporter):
    """Turns validated route sections into :class:`RouteConfig` values, or records why not."""

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

    def _routes(
        self, sections: list[RouteSection | None], clients: set[str], users: set[str]
    ) -> tuple[RouteConfig, ...]:
        routes: list[RouteConfig] = []
        seen: dict[tuple[str, int | None, str], int] = {}
        names: dict[str, int] = {}
        for index, section in enumerate(sections):
            if section is None:
                continue
            route = self._route(("routes", index), section, clients, users)
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

    def _route(
        self, base: Path, section: RouteSection, clients: set[str], users: set[str]
    ) -> RouteConfig | None:
        pattern = self._host_pattern((*base, "host"), section.host)
        prefix = self._path_prefix((*base, "path_prefix"), section.path_prefix)
        upstream = self._upstream((*base, "upstream"), section.upstream)
        if section.client not in clients:
            self.problem((*base, "client"), _unknown_client_message(section.client, clients))
        scope = self._scope((*base, "scope"), section.scope)
        params = self._token_params((*base, "token_params"), section.token_params)
        ca_file = self._ca_file((*base, "ca_file"), section.ca_file)
        upgrades = self._upgrades((*base, "upgrades"), section.upgrades)
        access = None
        if section.allow_from is not None or section.allow_users is not None:
            access = self._access_policy(base, section.allow_from, section.allow_users, users)
        if section.ca_file is not None and ca_file is None:
            return None
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
            ca_file=ca_file,
            client_certificate=section.client_certificate,
            https=HttpsMode(section.https or "intercept"),
            access=access,
            max_body_bytes=section.max_body_bytes,
            upgrades=upgrades,
        )

    def _upgrades(self, path: Path, values: list[str]) -> frozenset[str]:
        """Protocol names (RFC 9110 tokens), lower-cased; never a switch to HTTP/2."""
        names = set()
        for i, value in enumerate(values):
            name = value.strip().lower()
            if not _TOKEN.fullmatch(name):
                self.problem(
                    (*path, i),
                    f"'{value}' is not a protocol name; write one like websocket "
                    "(letters, digits and !#$%&'*+-.^_`|~, no version)",
                )
            elif name in NEVER_UPGRADES:
                self.problem(
                    (*path, i),
                    f"'{value}' is never allowed: HTTP/2 inside the switched connection "
                    "would bypass the proxy's header rules and token; remove it",
                )
            else:
                names.add(name)
        return frozenset(names)

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


@functools.cache
def _public_suffixes() -> PublicSuffixList:
    """The bundled Public Suffix List; unknown TLDs count as public."""
    return PublicSuffixList(accept_unknown=True)


def _unknown_client_message(name: str, clients: set[str]) -> str:
    guess = difflib.get_close_matches(name, sorted(clients), n=1)
    if guess:
        return f"unknown client '{name}'; did you mean '{guess[0]}'?"
    if clients:
        return f"unknown client '{name}'; define it under clients: ({', '.join(sorted(clients))})"
    return f"unknown client '{name}'; define it under the top-level 'clients:' section"
