"""ProxySite: the one proxy listener for plain HTTP, CONNECT and transparent TLS.

Each accepted connection is classified by its first bytes, *peeked* (``MSG_PEEK``) so
nothing is consumed before the connection's owner takes the socket:

- ``CONNECT `` → :meth:`TunnelBroker.handle_connect`;
- a TLS handshake record, with ``proxy.transparent`` → :meth:`TunnelBroker.handle_tls`
  (routed by SNI; the ClientHello is still unread when TLS starts or a splice relays it);
- anything else → aiohttp's HTTP protocol (our :class:`FrontDoor`), through
  ``loop.connect_accepted_socket``.

Only public asyncio API is used (``sock_accept``, ``add_reader``, ``MSG_PEEK``,
``connect_accepted_socket``), so it behaves the same on uvloop and with either of
aiohttp's HTTP parsers. Plain HTTP pays one peek per *connection*, not per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import select
import socket

from aiohttp import web

from m2m_proxy.clienthello import MAX_RECORD_BYTES, looks_like_tls, record_length
from m2m_proxy.config import Address
from m2m_proxy.connect import TunnelBroker, readable
from m2m_proxy.frontdoor import FrontDoor
from m2m_proxy.logs import Logger
from m2m_proxy.tasks import TaskSet

_CONNECT = b"CONNECT "
_PARTIAL_RETRY_S = 0.005
"""A peek that cannot decide yet leaves the bytes unread, so the socket stays readable:
wait this long before peeking again instead of spinning."""
_PARTIAL_RETRY_MAX_S = 0.25
FIRST_BYTES_TIMEOUT_S = 10.0
"""Default time a new connection has to say what it is (``proxy.header_timeout_s``)."""


class ProxySite(web.BaseSite):
    """A listening socket whose connections are classified before aiohttp sees them."""

    __slots__ = (
        "_accepting",
        "_address",
        "_broker",
        "_classifying",
        "_connections",
        "_first_bytes_timeout_s",
        "_log",
        "_max_connections",
        "_peek_bytes",
        "_sock",
        "_transparent",
    )

    def __init__(
        self,
        runner: web.BaseRunner,
        address: Address,
        *,
        broker: TunnelBroker,
        transparent: bool,
        log: Logger,
        backlog: int = 1024,
        first_bytes_timeout_s: float = FIRST_BYTES_TIMEOUT_S,
        max_connections: int = 10000,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._address = address
        self._broker = broker
        self._transparent = transparent
        self._log = log
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._connections = TaskSet()
        self._classifying: set[asyncio.Task[None]] = set()
        self._peek_bytes = MAX_RECORD_BYTES if transparent else len(_CONNECT)
        self._first_bytes_timeout_s = first_bytes_timeout_s
        self._max_connections = max_connections

    @property
    def name(self) -> str:
        return f"http://{self._address}"

    @property
    def port(self) -> int:
        if self._sock is None:
            raise RuntimeError("the proxy listener is not started")
        return int(self._sock.getsockname()[1])

    async def start(self) -> None:
        await super().start()
        family = socket.AF_INET6 if ":" in self._address.host else socket.AF_INET
        sock = socket.create_server(
            (self._address.host, self._address.port), family=family, backlog=self._backlog
        )
        sock.setblocking(False)
        self._sock = sock
        self._accepting = self._connections.start(self._accept_loop(sock), name="proxy-accept")

    async def stop(self) -> None:
        """Stop accepting and drop connections that have not said what they are yet;
        tunnels keep running until :meth:`drain`."""
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._sock is not None:
            self._sock.close()
        for task in list(self._classifying):
            task.cancel()
        await super().stop()

    async def drain(self, timeout_s: float) -> None:
        """Give tunnels up to ``timeout_s`` to end by themselves, then abort them."""
        await self._connections.wait(timeout_s)
        self._broker.abort_all()
        await self._connections.cancel_all()

    async def _accept_loop(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listening)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._log.error("accept_failed", reason=errno.errorcode.get(exc.errno, "?"))
                    await asyncio.sleep(0.1)  # out of descriptors: let some close first
                    continue
                raise
            sock.setblocking(False)
            if self._open_connections() >= self._max_connections:
                sock.close()  # over the limit: refuse at once rather than queue work
                self._log.warning("connection_refused", reason="max_connections")
                continue
            self._connections.start(self._dispatch(sock), name="proxy-connection")

    def _open_connections(self) -> int:
        """Connections aiohttp serves plus those being classified or tunnelled."""
        server = self._runner.server
        served = len(server.connections) if isinstance(server, web.Server) else 0
        return served + len(self._connections) - 1  # minus the accept loop itself

    async def _dispatch(self, sock: socket.socket) -> None:
        """Hand ``sock`` to its owner; close it if none takes it."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        try:
            if task is not None:
                self._classifying.add(task)
            try:
                async with asyncio.timeout(self._first_bytes_timeout_s):
                    head = await self._classify(loop, sock)
            finally:
                if task is not None:
                    self._classifying.discard(task)
            if head is None:
                sock.close()
            elif head.startswith(_CONNECT):
                await self._broker.handle_connect(sock)
            elif self._transparent and looks_like_tls(head):
                await self._broker.handle_tls(sock, head)
            else:
                server = self._runner.server
                if not isinstance(server, FrontDoor):
                    raise TypeError("the proxy site runs the proxy's FrontDoor server")
                await loop.connect_accepted_socket(server, sock)
        except (OSError, TimeoutError):
            sock.close()
        except BaseException:
            sock.close()
            raise

    async def _classify(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes | None:
        """The first bytes, enough to decide (a whole ClientHello record in transparent
        mode); None when the client closed without sending anything."""
        pause = _PARTIAL_RETRY_S
        while True:
            await readable(loop, sock)
            try:
                head = sock.recv(self._peek_bytes, socket.MSG_PEEK)
            except BlockingIOError:
                continue
            if not head:
                return None
            if not self._undecided(head):
                return head
            if _peer_closed(sock):
                return None  # a prefix and then EOF: nothing can complete it
            await asyncio.sleep(pause)  # "CONN..." so far: back off, never spin
            pause = min(pause * 2, _PARTIAL_RETRY_MAX_S)

    def _undecided(self, head: bytes) -> bool:
        """Whether ``head`` is too short to classify: a prefix of ``CONNECT `` or, in
        transparent mode, part of a TLS record."""
        if len(head) < len(_CONNECT) and _CONNECT.startswith(head):
            return True
        if self._transparent and looks_like_tls(head):
            needed = record_length(head)
            return needed is None or len(head) < min(needed, MAX_RECORD_BYTES)
        return False


def _peer_closed(sock: socket.socket) -> bool:
    """Whether the peer has shut down its sending side (``POLLRDHUP``), even though
    bytes it sent are still unread; a peek cannot tell that on its own."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP) for _fd, events in poller.poll(0))
