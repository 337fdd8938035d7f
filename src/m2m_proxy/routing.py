"""RouteTable: which route, if any, a destination belongs to. Pure.

Precedence (DESIGN.md §3): an exact host beats a wildcard; a longer wildcard suffix
beats a shorter one; within a host pattern the longest matching ``path_prefix`` wins.
A route without a port matches the scheme's default port only; a route with a port
matches that port for either scheme. Path prefixes match whole segments: ``/v1``
matches ``/v1`` and ``/v1/x`` but not ``/v10``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from m2m_proxy.authority import effective_port
from m2m_proxy.config import RouteConfig
from m2m_proxy.target import Target


class RouteTable:
    """Exact hosts in a dict, wildcards in a dict keyed by suffix: O(labels) lookups."""

    def __init__(self, routes: Iterable[RouteConfig]) -> None:
        exact: dict[str, list[RouteConfig]] = {}
        wildcard: dict[str, list[RouteConfig]] = {}
        for route in routes:
            if route.is_wildcard:
                wildcard.setdefault(route.host[2:], []).append(route)
            else:
                exact.setdefault(route.host, []).append(route)
        self._exact = {h: _by_prefix_length(rs) for h, rs in exact.items()}
        self._wildcard = {s: _by_prefix_length(rs) for s, rs in wildcard.items()}

    def match(self, target: Target) -> RouteConfig | None:
        """The best route for ``target``, or None."""
        return self._search(target, _first_match)

    def covering(self, target: Target) -> RouteConfig | None:
        """The best route for ``target``'s host and port whatever the path: CONNECT
        has no path, and decides for every request of its tunnel."""
        return self._search(target, _first_for_origin)

    def _search(
        self,
        target: Target,
        first: Callable[[tuple[RouteConfig, ...], Target], RouteConfig | None],
    ) -> RouteConfig | None:
        host = target.host
        candidates = self._exact.get(host)
        if candidates is not None:
            found = first(candidates, target)
            if found is not None:
                return found
        if not self._wildcard:
            return None
        dot = host.find(".")
        while dot >= 0:
            candidates = self._wildcard.get(host[dot + 1 :])
            if candidates is not None:
                found = first(candidates, target)
                if found is not None:
                    return found
            dot = host.find(".", dot + 1)
        return None


def _by_prefix_length(routes: list[RouteConfig]) -> tuple[RouteConfig, ...]:
    return tuple(sorted(routes, key=lambda r: len(r.path_prefix), reverse=True))


def _port_matches(route: RouteConfig, target: Target) -> bool:
    if route.port is None:
        return target.port is None
    return route.port == effective_port(target.scheme, target.port)


def _first_for_origin(candidates: tuple[RouteConfig, ...], target: Target) -> RouteConfig | None:
    for route in candidates:
        if _port_matches(route, target):
            return route
    return None


def _first_match(candidates: tuple[RouteConfig, ...], target: Target) -> RouteConfig | None:
    for route in candidates:
        if not _port_matches(route, target):
            continue
        prefix = route.path_prefix
        if prefix:
            path = target.path
            if not (path == prefix or path.startswith(prefix + "/")):
                continue
        return route
    return None
