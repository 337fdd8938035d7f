"""ProxyHandler: the request path from the client's request to the response.

parse target → match route (or apply the ``unmatched`` policy) → read the body
→ forward with the route's credential → render any ProxyError as problem+json →
one ``request_completed`` log line. Knows nothing about sockets or the IdP.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable

from aiohttp import HttpVersion, HttpVersion10, HttpVersion11, web
from yarl import URL

from m2m_proxy.access import Access
from m2m_proxy.authority import effective_port
from m2m_proxy.config import ProxySettings, RouteConfig, Unmatched
from m2m_proxy.egress import EgressPolicy
from m2m_proxy.errors import (
    BadRequestError,
    LoopDetectedError,
    MethodNotAllowedError,
    NotSupportedError,
    ProxyError,
    RouteDeniedError,
    TransferCodingNotSupportedError,
    VersionNotSupportedError,
    render_problem,
)
from m2m_proxy.forward import NO_BODY, Body, Exchange, Forwarder
from m2m_proxy.frontdoor import ProblemRequestHandler
from m2m_proxy.headers import received_by
from m2m_proxy.logs import AccessLog
from m2m_proxy.metrics import Metrics
from m2m_proxy.routing import RouteTable
from m2m_proxy.target import Target, TunnelOrigin, parse_target, parse_tunneled_target
from m2m_proxy.upgrade import SWITCHING_PROTOCOLS, ProtocolSwitch

CLIENT_CLOSED = 499
"""Status logged when the client closed the connection before the response was done."""


class ProxyHandler:
    """The aiohttp low-level handler: ``web.Server(ProxyHandler(...))``."""

    def __init__(
        self,
        routes: RouteTable,
        forwarder: Forwarder,
        settings: ProxySettings,
        access_log: AccessLog,
        *,
        clock: Callable[[], float] = time.perf_counter,
        upstream_tls: Callable[[RouteConfig], ssl.SSLContext | None] = lambda _route: None,
        metrics: Metrics | None = None,
        egress: EgressPolicy | None = None,
    ) -> None:
        """``upstream_tls(route)`` is the TLS context for the route's upstream (None:
        the system store)."""
        self._upstream_tls = upstream_tls
        self._metrics = metrics if metrics is not None else Metrics()
        self._egress = egress if egress is not None else EgressPolicy(settings)
        self._access = Access(settings.access, settings.users)
        self._name = settings.name
        self._routes = routes
        self._forwarder = forwarder
        self._settings = settings
        self._access_log = access_log
        self._clock = clock

    def use(self, routes: RouteTable, settings: ProxySettings) -> None:
        """Swap in a reloaded config; requests already running keep their route."""
        self._access = Access(settings.access, settings.users)
        self._routes, self._settings = routes, settings

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        exchange = Exchange(started=self._clock())
        protocol = request.protocol
        if not isinstance(protocol, ProblemRequestHandler):  # only in unit-level setups
            return await self._handle(request, exchange, None)
        protocol.headers_received()
        try:
            return await self._handle(request, exchange, protocol.tunnel)
        finally:
            protocol.request_done()

    async def _handle(
        self, request: web.BaseRequest, exchange: Exchange, tunnel: TunnelOrigin | None
    ) -> web.StreamResponse:
        try:
            if request.method == "CONNECT":
                raise NotSupportedError(
                    "CONNECT must be the first request on a new connection to the proxy"
                )
            if request.version not in _VERSIONS:
                if request.version < HttpVersion10:  # HTTP/0.9: no headers, no framing
                    raise BadRequestError("HTTP/0.9 requests are not supported")
                raise VersionNotSupportedError("only HTTP/1.0 and HTTP/1.1 are spoken here")
            if "Transfer-Encoding" in request.headers:
                _check_framing(request)
            if tunnel is None:
                target = parse_target(request.raw_path, request.headers.get("Host"))
            else:
                target = parse_tunneled_target(
                    request.raw_path, request.headers.get("Host"), tunnel
                )
            route = self._routes.match(target)
            if route is not None:
                exchange.route = route.name
            elif self._settings.unmatched is Unmatched.DENY:
                raise RouteDeniedError(
                    f"no route matches host '{target.host}'; add a route for it or set "
                    "proxy.unmatched: passthrough"
                )
            self._guard(request, target, route, tunnel)
            url, host = self._upstream_of(target, route)
            switch = (
                ProtocolSwitch.requested(
                    request, route.upgrades, self._settings.tunnel_idle_timeout_s
                )
                if route is not None and route.upgrades
                else None
            )
            body = (
                await Body.read(
                    request,
                    self._settings.replay_body_limit_bytes,
                    route.max_body_bytes
                    if route is not None and route.max_body_bytes is not None
                    else self._settings.max_body_bytes,
                    self._settings.body_timeout_s,
                )
                if request.body_exists
                else NO_BODY
            )
            response = await self._forwarder.forward(
                request,
                url=url,
                host=host,
                key=route.credential if route is not None else None,
                body=body,
                exchange=exchange,
                tls=self._upstream_tls(route) if route is not None else None,
                guarded=route is None,
                switch=switch,
            )
        except ProxyError as exc:
            exchange.error = exc.code
            response = self._problem(exc, request.version)
        except (asyncio.CancelledError, ConnectionError):
            # The client went away mid-request; logged with nginx's 499 convention
            # (after a protocol switch that is how the relay ends: logged as the 101).
            if exchange.switched:
                self._log_completed(request, exchange, SWITCHING_PROTOCOLS)
                raise
            exchange.error = "client_closed"
            self._log_completed(request, exchange, CLIENT_CLOSED)
            raise
        self._log_completed(request, exchange, response.status)
        return response

    def _guard(
        self,
        request: web.BaseRequest,
        target: Target,
        route: RouteConfig | None,
        tunnel: TunnelOrigin | None,
    ) -> None:
        """Before any body is read: access, loops, TRACE, the egress of passthrough."""
        rule = route.access if route is not None else None
        if rule is not None or not self._access.open_by_default:
            self._access.check(
                rule,
                request.remote,
                request.headers.get("Proxy-Authorization"),
                user=tunnel.user if tunnel is not None else None,
            )
        via = request.headers.get("Via")
        if via is not None and self._name in received_by(via):
            raise LoopDetectedError(f"the request already passed through '{self._name}'")
        if route is None:
            self._egress.check_literal(target.host, effective_port(target.scheme, target.port))
        elif request.method == "TRACE":
            raise MethodNotAllowedError(
                "TRACE is refused on routes that add a token: it would echo the token back"
            )

    def _log_completed(self, request: web.BaseRequest, exchange: Exchange, status: int) -> None:
        now = self._clock()
        duration = now - exchange.started
        self._access_log.completed(
            route=exchange.route,
            method=request.method,
            status=status,
            duration_s=duration,
            token_cache=exchange.token,
            retried=exchange.replayed,
            error=exchange.error,
        )
        responded = exchange.responded or now
        self._metrics.request_completed(
            route=exchange.route,
            method=request.method,
            status=status,
            duration_s=duration,
            added_s=responded - exchange.started - exchange.waited,
            token=exchange.token,
            replayed=exchange.replayed,
            error=exchange.error or None,
        )

    def _upstream_of(self, target: Target, route: RouteConfig | None) -> tuple[URL, str]:
        """The upstream URL and Host header; a route's ``upstream`` rewrites the origin.

        An https target is never sent in cleartext, whatever the route says.
        """
        if route is None or route.upstream is None:
            base = f"{target.scheme}://{target.authority}"
            return URL(base + target.path_qs, encoded=True), target.authority
        upstream = route.upstream
        if target.scheme == "https" and upstream.scheme == "http":
            raise RouteDeniedError(
                f"route '{route.name}' would send an https request upstream over plain "
                "http; make its upstream https://"
            )
        return URL(upstream.base_url + target.path_qs, encoded=True), upstream.authority

    def _problem(self, exc: ProxyError, version: HttpVersion) -> web.Response:
        """``exc`` as problem+json; a request in a version we do not speak gets its
        answer in HTTP/1.1, on a connection that then closes."""
        status, headers, body = render_problem(exc, self._settings.name)
        kind = web.Response if version in _VERSIONS else _Http11Response
        response = kind(status=status, headers=headers, body=body)
        response.headers["Server"] = self._settings.name  # not aiohttp's version string
        if isinstance(exc, BadRequestError) or kind is _Http11Response:
            response.force_close()  # the framing may be in doubt: never reuse
        return response


class _Http11Response(web.Response):
    """A response whose status line says HTTP/1.1 whatever the request's version.

    aiohttp writes ``request.version`` into the status line; for an HTTP/2.0 or 0.9
    request line (refused with 505/400) that would be a version we do not speak
    (RFC 9110 §2.5: a server sends its own version). The status line is the one
    aiohttp's ``_write_headers`` builds, with the version fixed.
    """

    async def _write_headers(self) -> None:
        writer = self._payload_writer
        if writer is None:
            raise RuntimeError("headers written before prepare()")
        await writer.write_headers(f"HTTP/1.1 {self.status} {self.reason}", self.headers)
        if self._send_headers_immediately:
            writer.send_headers()


_VERSIONS = frozenset({HttpVersion10, HttpVersion11})


def _check_framing(request: web.BaseRequest) -> None:
    """RFC 9112 §6: only ``chunked`` (last) is a transfer coding the proxy decodes;
    with Content-Length too, or on HTTP/1.0, the framing is ambiguous: refuse."""
    if "Content-Length" in request.headers:
        raise BadRequestError("Transfer-Encoding and Content-Length together are refused")
    if request.version == HttpVersion10:
        raise BadRequestError("Transfer-Encoding is not allowed in HTTP/1.0")
    codings = [
        c.strip().lower()
        for value in request.headers.getall("Transfer-Encoding")
        for c in value.split(",")
        if c.strip()  # empty list elements are allowed (RFC 9110 §5.6.1)
    ]
    if codings != ["chunked"]:
        raise TransferCodingNotSupportedError(
            "only Transfer-Encoding: chunked is supported; send the body unencoded"
        )
