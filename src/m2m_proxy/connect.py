"""TunnelBroker: CONNECT requests and (transparent mode) raw TLS connections.

For a destination ``host:port`` the decision (:func:`decide`) is:

- a routed host: ``intercept`` (the default; needs the interception CA) terminates
  TLS with a leaf certificate minted for the host, and every decrypted request goes
  through the same HTTP handler as plain requests; ``https: tunnel`` relays bytes;
- an unrouted host: a blind tunnel under ``unmatched: passthrough`` when its port is
  in ``proxy.connect_ports``, else 403;
- a routed host whose intercept has no CA: 403 naming the fix.

The broker works on the accepted socket directly: the CONNECT head is consumed
exactly (peeked, then read up to its blank line), so nothing the client sends after
it, such as an eager ClientHello, is lost. TLS is then started with
``loop.connect_accepted_socket(ssl=...)``: public asyncio API only. Refusals are
problem+json with ``Connection: close``, written before any upstream connection.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass
from enum import StrEnum
from http import HTTPStatus
from typing import Any

from m2m_proxy.access import Access
from m2m_proxy.authority import AuthorityError, canonical_port, effective_port, split_authority
from m2m_proxy.clienthello import ClientHelloError, parse_client_hello
from m2m_proxy.config import HttpsMode, ProxySettings, Unmatched
from m2m_proxy.egress import EgressPolicy
from m2m_proxy.errors import (
    BadRequestError,
    DestinationDeniedError,
    LoopDetectedError,
    ProxyError,
    RouteDeniedError,
    UpstreamError,
    UpstreamUnreachableError,
    render_problem,
)
from m2m_proxy.frontdoor import FrontDoor
from m2m_proxy.interception_ca import LeafCertificates
from m2m_proxy.logs import Logger
from m2m_proxy.metrics import Metrics
from m2m_proxy.relay import Tunnel
from m2m_proxy.routing import RouteTable
from m2m_proxy.target import Target, TunnelOrigin

MAX_CONNECT_HEAD_BYTES = 8192
_HEAD_END = b"\r\n\r\n"
_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


class Mode(StrEnum):
    INTERCEPT = "intercept"
    TUNNEL = "tunnel"


@dataclass(frozen=True, slots=True)
class Decision:
    mode: Mode
    route: str | None
    """The route's name, None for a passthrough tunnel."""


def decide(target: Target, routes: RouteTable, settings: ProxySettings) -> Decision:
    """Intercept, tunnel, or raise RouteDeniedError; ``target`` is https://host[:port]/."""
    route = routes.covering(target)
    if route is not None:
        if route.https is HttpsMode.TUNNEL:
            return Decision(Mode.TUNNEL, route.name)
        if not settings.intercepts:
            raise RouteDeniedError(
                f"route '{route.name}' needs TLS interception to add its token, and no "
                "interception CA is configured; run `m2m-proxy ca init --dir DIR`, set "
                "proxy.ca_cert_file and proxy.ca_key_file, or set https: tunnel on the route"
            )
        return Decision(Mode.INTERCEPT, route.name)
    if settings.unmatched is not Unmatched.PASSTHROUGH:
        raise RouteDeniedError(
            f"no route matches host '{target.host}'; add a route for it or set "
            "proxy.unmatched: passthrough"
        )
    port = effective_port("https", target.port)
    if port not in settings.connect_ports:
        raise RouteDeniedError(
            f"CONNECT to port {port} is not allowed; add it to proxy.connect_ports or "
            "route the host"
        )
    return Decision(Mode.TUNNEL, None)


def parse_connect_head(head: bytes) -> Target:
    """The destination of a CONNECT request head (request line and headers)."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequestError("the CONNECT request is not ASCII") from None
    line, _, _headers = text.partition("\r\n")
    if "\x00" in text or "\r" in line or "\n" in line:
        raise BadRequestError("the CONNECT request contains control characters")
    if header_of(head, "Transfer-Encoding") is not None or (
        header_of(head, "Content-Length") not in (None, "0")
    ):
        raise BadRequestError("a CONNECT request has no body; send the bytes through the tunnel")
    parts = line.split(" ")
    if len(parts) != 3 or parts[0] != "CONNECT" or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequestError("write the request line as CONNECT host:port HTTP/1.1")
    authority = parts[1]
    if "@" in authority or "/" in authority:
        raise BadRequestError("the CONNECT target must be host:port, nothing else")
    try:
        host, port = split_authority(authority)
    except AuthorityError as exc:
        raise BadRequestError(f"bad CONNECT target: {exc}") from None
    if port is None:
        raise BadRequestError("the CONNECT target needs a port, e.g. api.example.com:443")
    return Target("https", host, canonical_port("https", port), "/")


def header_of(head: bytes, name: str) -> str | None:
    """The value of header ``name`` in a request head, None if absent or repeated."""
    found = None
    wanted = name.lower().encode()
    for line in head.split(b"\r\n")[1:]:
        field, sep, value = line.partition(b":")
        if sep and field.strip().lower() == wanted:
            if found is not None:
                return None
            found = value.strip().decode("latin-1")
    return found


class TunnelBroker:
    """Answers CONNECT and transparent TLS connections; owns their tunnels."""

    def __init__(
        self,
        *,
        routes: RouteTable,
        settings: ProxySettings,
        front_door: FrontDoor,
        leaves: LeafCertificates | None,
        log: Logger,
        metrics: Metrics | None = None,
        egress: EgressPolicy | None = None,
    ) -> None:
        self._routes = routes
        self._settings = settings
        self._front_door = front_door
        self._leaves = leaves
        self._log = log
        self._tunnels: set[Tunnel] = set()
        self._metrics = metrics if metrics is not None else Metrics()
        self._egress = egress if egress is not None else EgressPolicy(settings)
        self._access = Access(settings.access, settings.users)

    def use(self, routes: RouteTable, settings: ProxySettings) -> None:
        """Swap in a reloaded config; tunnels already open are not affected."""
        self._access = Access(settings.access, settings.users)
        self._routes, self._settings = routes, settings

    def open_tunnels(self) -> dict[str, int]:
        """Blind tunnels open now, by mode (for the open_tunnels gauge)."""
        return {Mode.TUNNEL.value: len(self._tunnels)}

    async def handle_connect(self, sock: socket.socket) -> None:
        """Serve one connection that starts with CONNECT; the socket is ours."""
        try:
            head = await _read_head(sock, self._settings.tls_handshake_timeout_s)
            target = parse_connect_head(head)
            decision = decide(target, self._routes, self._settings)
            user = self._check_access(sock, target, header_of(head, "Proxy-Authorization"))
        except ProxyError as exc:
            self._log.info("connect_refused", code=exc.code, status=exc.status)
            await _refuse(sock, exc, self._settings.name)
            return
        except (OSError, TimeoutError):
            sock.close()
            return
        await self._serve(sock, target, decision, answer_connect=True, user=user)

    async def handle_tls(self, sock: socket.socket, head: bytes) -> None:
        """Serve a redirected connection whose first record (``head``) is a ClientHello."""
        try:
            hello = parse_client_hello(head)
        except ClientHelloError as exc:
            self._log.info("transparent_refused", reason=str(exc))
            sock.close()
            return
        if hello.server_name is None:
            self._log.info("transparent_refused", reason="the ClientHello names no server")
            sock.close()
            return
        try:
            host, _ = split_authority(hello.server_name)
            target = Target("https", host, None, "/")
            decision = decide(target, self._routes, self._settings)
            user = self._check_access(sock, target, None)
        except (AuthorityError, ProxyError) as exc:
            self._log.info("transparent_refused", reason=str(exc), sni=hello.server_name)
            sock.close()  # no HTTP to answer with: the client is speaking TLS
            return
        await self._serve(sock, target, decision, answer_connect=False, user=user)

    def _check_access(
        self, sock: socket.socket, target: Target, proxy_authorization: str | None
    ) -> str | None:
        """allow_from / allow_users of the host's route (or the default); the user."""
        route = self._routes.covering(target)
        try:
            peer = str(sock.getpeername()[0])
        except OSError:
            peer = None
        policy = route.access if route is not None else None
        return self._access.check(policy, peer, proxy_authorization)

    async def _serve(
        self,
        sock: socket.socket,
        target: Target,
        decision: Decision,
        *,
        answer_connect: bool,
        user: str | None,
    ) -> None:
        if decision.mode is Mode.INTERCEPT:
            origin = TunnelOrigin(target.host, target.port, user=user)
            await self._intercept(sock, origin, decision, answer_connect=answer_connect)
        else:
            await self._tunnel(sock, target, decision, answer_connect=answer_connect)

    async def _intercept(
        self, sock: socket.socket, origin: TunnelOrigin, decision: Decision, *, answer_connect: bool
    ) -> None:
        if self._leaves is None:  # decide() only intercepts with a CA
            raise RuntimeError("interception without a CA")
        loop = asyncio.get_running_loop()
        try:
            minted = self._leaves.minted
            context = self._leaves.server_context(origin.host)
            if self._leaves.minted != minted:
                self._metrics.certificates_minted += 1
                self._log.info("certificate_minted", route=decision.route, host=origin.host)
            if context.sni_callback is None:
                context.sni_callback = _remember_server_name
            if answer_connect:
                await loop.sock_sendall(sock, _ESTABLISHED)
            await loop.connect_accepted_socket(
                lambda: self._front_door.tunnel_protocol(origin),
                sock,
                ssl=context,
                ssl_handshake_timeout=self._settings.tls_handshake_timeout_s,
            )
        except (OSError, ssl.SSLError, TimeoutError, ValueError) as exc:
            reason = _handshake_failure(exc)
            self._metrics.handshake_failed(reason)
            self._log.info("tls_intercept_failed", route=decision.route, reason=reason)
            sock.close()
            return
        self._metrics.tunnel_opened(Mode.INTERCEPT.value)
        self._log.debug("tunnel_opened", mode=Mode.INTERCEPT.value, route=decision.route)

    async def _tunnel(
        self, sock: socket.socket, target: Target, decision: Decision, *, answer_connect: bool
    ) -> None:
        loop = asyncio.get_running_loop()
        port = effective_port("https", target.port)
        try:
            address = target.host
            if decision.route is None:  # passthrough: the egress policy picks the address
                address = await self._egress.resolve(target.host, port)
            tunnel = await Tunnel.connect(
                address, port, connect_timeout_s=self._settings.connect_timeout_s
            )
        except OSError:
            exc = UpstreamUnreachableError(f"cannot resolve {target.host}")
            self._log.info("connect_failed", route=decision.route, code=exc.code)
            if answer_connect:
                await _refuse(sock, exc, self._settings.name)
            else:
                sock.close()
            return
        except (UpstreamError, DestinationDeniedError, LoopDetectedError) as exc:
            self._log.info("connect_failed", route=decision.route, code=exc.code)
            if answer_connect:
                await _refuse(sock, exc, self._settings.name)
            else:
                sock.close()
            return
        self._tunnels.add(tunnel)
        try:
            if answer_connect:
                await loop.sock_sendall(sock, _ESTABLISHED)
            self._metrics.tunnel_opened(Mode.TUNNEL.value)
            self._log.debug("tunnel_opened", mode=Mode.TUNNEL.value, route=decision.route)
            stats = await tunnel.run(sock, idle_timeout_s=self._settings.tunnel_idle_timeout_s)
        except OSError:
            tunnel.abort()
            sock.close()
            return
        finally:
            self._tunnels.discard(tunnel)
        self._metrics.tunnel_closed(Mode.TUNNEL.value, stats.bytes_up, stats.bytes_down)
        self._log.info(
            "tunnel_closed",
            mode=Mode.TUNNEL.value,
            route=decision.route,
            bytes_up=stats.bytes_up,
            bytes_down=stats.bytes_down,
            duration_ms=round(stats.duration_s * 1000),
            closed_by=stats.closed_by,
        )

    def abort_all(self) -> None:
        """Close every blind tunnel (proxy shutdown)."""
        for tunnel in list(self._tunnels):
            tunnel.abort()


def _remember_server_name(ssl_object: Any, server_name: str | None, _context: Any) -> None:
    """sni_callback: keep the client's SNI for the tunnel's Host check."""
    ssl_object.m2m_server_name = server_name


def _handshake_failure(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or type(exc).__name__  # e.g. TLSV1_ALERT_UNKNOWN_CA
    if isinstance(exc, TimeoutError):
        return "handshake_timeout"
    return type(exc).__name__


async def _read_head(sock: socket.socket, timeout_s: float) -> bytes:
    """Consume exactly the request head (through its blank line) from ``sock``."""
    loop = asyncio.get_running_loop()
    head = b""
    async with asyncio.timeout(timeout_s):
        while True:
            await readable(loop, sock)
            try:
                peeked = sock.recv(MAX_CONNECT_HEAD_BYTES - len(head) + 4, socket.MSG_PEEK)
            except BlockingIOError:
                continue
            if not peeked:
                raise ConnectionResetError("the client closed before the CONNECT head ended")
            window = head[-3:] + peeked
            end = window.find(_HEAD_END)
            cut = window if end < 0 else window[: end + 4]
            if b"\n" in cut.replace(b"\r\n", b""):
                raise BadRequestError("the CONNECT request has a bare LF; end lines with CRLF")
            take = len(peeked) if end < 0 else end + 4 - len(head[-3:])
            head += sock.recv(take)
            if end >= 0:
                return head
            if len(head) >= MAX_CONNECT_HEAD_BYTES:
                raise BadRequestError(
                    f"the CONNECT request head is over {MAX_CONNECT_HEAD_BYTES} bytes"
                )


async def readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Wait until ``sock`` has bytes to read (or EOF); the socket is not read."""
    waiter: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not waiter.done():
            waiter.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await waiter
    finally:
        loop.remove_reader(fd)


async def _refuse(sock: socket.socket, exc: ProxyError, proxy_name: str) -> None:
    status, headers, body = render_problem(exc, proxy_name)
    lines = [f"HTTP/1.1 {status} {_reason(status)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    try:
        await asyncio.get_running_loop().sock_sendall(sock, "\r\n".join(lines).encode() + body)
    except OSError:
        pass
    finally:
        sock.close()


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
