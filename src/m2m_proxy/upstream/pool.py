"""UpstreamPool: keep-alive connections to upstreams, and the request that uses them.

Idle connections are kept per (scheme, host, port, TLS context, guarded), newest
first, for ``keepalive_s`` (30 s) and then closed. A connection the upstream closed
while idle is noticed by its protocol (``connection_lost``) and never handed out.
The one race left, a close that arrives after the request was written, is handled
by Go's net/http rule: a request that failed on a reused connection before any
byte of response arrived is sent again, once, only when its body was buffered and
its method is replayable (``head.replayable``); anything else reaches the client as
an error, so nothing a client sent is ever duplicated.

``guarded`` requests (no route names their destination) connect only to an address
the egress policy allows; the policy's own resolution is what is connected to.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque

from multidict import CIMultiDict, istr
from yarl import URL

from m2m_proxy.egress import EgressPolicy
from m2m_proxy.errors import (
    BadRequestError,
    ProxyError,
    UpstreamTimeoutError,
    UpstreamTlsError,
    UpstreamUnreachableError,
)
from m2m_proxy.tasks import TaskSet
from m2m_proxy.tls import client_context
from m2m_proxy.upstream.connection import (
    ClosedBeforeResponseError,
    Connection,
    PoolKey,
    RequestBody,
)
from m2m_proxy.upstream.head import HeadInjectionError, framing, replayable, request_head
from m2m_proxy.upstream.response import UpstreamResponse

_UPGRADE = istr("Upgrade")
"""Only the proxy's upgrade path sets it (headers.py strips the client's): a request
carrying it may be answered with 101."""
KEEPALIVE_S = 30.0
"""How long an idle connection is kept (aiohttp's keepalive_timeout as app.py set it)."""
_CLOSE_WAIT_S = 1.0
"""At shutdown, how long graceful closes (TLS close_notify) may take before an abort."""


class UpstreamPool:
    """The lean upstream client: one instance per app, shared by every request."""

    def __init__(
        self,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        egress: EgressPolicy | None,
        keepalive_s: float = KEEPALIVE_S,
        default_tls: ssl.SSLContext | None = None,
    ) -> None:
        """``egress`` judges guarded requests (None: none may be made); https without
        a context of its own uses ``default_tls`` (default: the system trust store)."""
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._egress = egress
        self._keepalive_s = keepalive_s
        self._default_tls = default_tls if default_tls is not None else client_context()
        self._idle: dict[PoolKey, deque[Connection]] = {}
        self._connections: set[Connection] = set()
        self._tasks = TaskSet()
        self._sweep: asyncio.TimerHandle | None = None
        self._closing = False

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    @property
    def idle_connections(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    async def request(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: RequestBody,
        *,
        content_length: int | None,
        ssl: ssl.SSLContext | None,
        guarded: bool,
    ) -> UpstreamResponse:
        """Send one request, return its response once the head has arrived.

        ``headers`` go out in their order, then the framing: Content-Length when
        ``content_length`` is known, else chunked for a body. Raises the project's
        Upstream*Error, DestinationDeniedError or LoopDetectedError, never an
        exception of the network layer."""
        scheme = url.scheme
        host = url.raw_host
        port = url.port
        if host is None or port is None or scheme not in ("http", "https"):
            raise BadRequestError(f"cannot send a request to '{url.scheme}://{url.raw_host}'")
        tls = (ssl if ssl is not None else self._default_tls) if scheme == "https" else None
        key = PoolKey(scheme, host, port, tls, guarded)
        frame = framing(method, body is not None, content_length)
        try:
            head = request_head(method, url.raw_path_qs, headers, frame)
        except HeadInjectionError as exc:
            raise BadRequestError(str(exc)) from None
        retried = False
        while True:
            conn = self._idle_connection(key)
            if conn is None:
                conn = await self._connect(key)
            try:
                return await conn.exchange(
                    head,
                    body,
                    content_length=content_length,
                    chunked=frame.chunked,
                    head_request=method == "HEAD",
                    upgrade=_UPGRADE in headers,
                )
            except ClosedBeforeResponseError:
                if retried or not conn.reused or not _replayable(method, headers, body):
                    raise
                retried = True  # once: the next failure goes to the client

    def _idle_connection(self, key: PoolKey) -> Connection | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            conn.idle = False
            if not conn.lost and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def _connect(self, key: PoolKey) -> Connection:
        if self._closing:
            raise UpstreamUnreachableError("the proxy is shutting down")
        loop = asyncio.get_running_loop()

        def protocol() -> Connection:
            return Connection(
                loop,
                key,
                read_timeout_s=self._read_timeout_s,
                tasks=self._tasks,
                on_idle=self._put_idle,
                on_lost=self._forget,
            )

        try:
            async with asyncio.timeout(self._connect_timeout_s):
                address = key.host
                if key.guarded:
                    if self._egress is None:
                        raise RuntimeError("a guarded request needs the egress policy")
                    address = await self._egress.resolve(key.host, key.port)
                _, conn = await loop.create_connection(
                    protocol,
                    address,
                    key.port,
                    ssl=key.tls,
                    server_hostname=key.host.rstrip(".") if key.tls is not None else None,
                )
        except ProxyError:
            raise  # DestinationDeniedError, LoopDetectedError from the egress policy
        except ssl.SSLCertVerificationError as exc:
            raise UpstreamTlsError("the upstream's TLS certificate failed verification") from exc
        except ssl.SSLError as exc:
            raise UpstreamTlsError("TLS with the upstream failed") from exc
        except TimeoutError as exc:
            raise UpstreamTimeoutError("the upstream did not answer in time") from exc
        except OSError as exc:
            raise UpstreamUnreachableError(
                f"cannot connect to the upstream ({exc.strerror or 'connection failed'})"
            ) from exc
        if self._closing:
            conn.abort()
            raise UpstreamUnreachableError("the proxy is shutting down")
        self._connections.add(conn)
        return conn

    def _put_idle(self, conn: Connection) -> None:
        if self._closing:
            conn.close()
            return
        loop = asyncio.get_running_loop()
        conn.idle = True
        conn.idle_since = loop.time()
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = deque()
        idle.append(conn)
        if self._sweep is None:
            self._sweep = loop.call_at(conn.idle_since + self._keepalive_s, self._expire)

    def _forget(self, conn: Connection) -> None:
        self._connections.discard(conn)
        if conn.idle:
            conn.idle = False
            idle = self._idle.get(conn.key)
            if idle is not None and conn in idle:
                idle.remove(conn)

    def _expire(self) -> None:
        """Close connections idle for ``keepalive_s``; re-arm for the next to expire."""
        self._sweep = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        next_at: float | None = None
        for key, idle in list(self._idle.items()):
            while idle and idle[0].idle_since + self._keepalive_s <= now:
                conn = idle.popleft()
                conn.idle = False
                conn.close()
            if not idle:
                del self._idle[key]
                continue
            at = idle[0].idle_since + self._keepalive_s
            next_at = at if next_at is None else min(next_at, at)
        if next_at is not None and not self._closing:
            self._sweep = loop.call_at(next_at, self._expire)

    async def close(self) -> None:
        """Close every connection (idle or not) and wait until they are gone."""
        self._closing = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        await self._tasks.cancel_all()
        self._idle.clear()
        conns = list(self._connections)
        for conn in conns:
            conn.close()
        pending = [conn.closed for conn in conns if not conn.closed.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=_CLOSE_WAIT_S)
            if still:
                for conn in conns:
                    if not conn.closed.done():
                        conn.abort()
                await asyncio.wait(still, timeout=_CLOSE_WAIT_S)


def _replayable(method: str, headers: CIMultiDict[str], body: RequestBody) -> bool:
    """May the request go out again? Only a buffered body can be sent twice."""
    return (body is None or isinstance(body, bytes)) and replayable(method, headers)
