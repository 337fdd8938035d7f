"""Protocol upgrades (RFC 9110 §7.8, e.g. WebSocket) on routes that allow them.

A route's ``upgrades`` names the protocols a client may switch to; everywhere else
``Upgrade`` is hop-by-hop and removed (headers.py). For an HTTP/1.1 ``GET`` without a
body that carries ``Connection: upgrade`` and an allowed ``Upgrade``, the Forwarder
sends ``Connection: Upgrade`` and the allowed protocols upstream with the route's
token (the 401 replay applies as to any GET). A ``101`` naming a protocol that was
asked for is passed to the client (hop-by-hop fields removed, ``Upgrade`` and
``Connection`` kept), and then bytes are relayed both ways until either side closes
or nothing moves for ``proxy.tunnel_idle_timeout_s``. A ``101`` to another protocol
is a ``502``; any other answer is passed on as usual.

The client side stays aiohttp's connection: its bytes arrive through the payload-parser
slot that aiohttp's own WebSocketResponse uses (``set_parser``), and the handler task
lives until the relay ends, so the request is logged once, with status 101. The
upstream side is the lean client's connection, taken out of the pool
(``UpstreamResponse.detach``) and given a protocol of its own. Flow control as in
relay.py: a side whose write buffer is full stops the other side's reading.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from aiohttp import HttpVersion11, web
from multidict import CIMultiDict, CIMultiDictProxy, istr

from m2m_proxy.errors import UpstreamProtocolError
from m2m_proxy.headers import downstream_response_headers
from m2m_proxy.upstream import Response, UpstreamResponse

if TYPE_CHECKING:
    from m2m_proxy.forward import Exchange

SWITCHING_PROTOCOLS = 101
_CONNECTION = istr("Connection")
_UPGRADE = istr("Upgrade")
_CONTENT_LENGTH = istr("Content-Length")


def protocol_names(values: list[str]) -> list[str]:
    """'websocket, Foo/2' → ['websocket', 'foo']: the lower-cased protocol names."""
    names = []
    for value in values:
        for item in value.split(","):
            name = item.strip().split("/", 1)[0].strip().lower()
            if name:
                names.append(name)
    return names


def forwarded_protocols(
    method: str,
    http11: bool,
    has_body: bool,
    headers: CIMultiDictProxy[str],
    allowed: frozenset[str],
) -> str | None:
    """The ``Upgrade`` value to send upstream (the allowed protocols the client offered,
    in its order), or None: the request is an ordinary one and Upgrade is removed."""
    if method != "GET" or not http11 or has_body or not allowed:
        return None
    if "upgrade" not in protocol_names(headers.getall(_CONNECTION, [])):
        return None
    offered = [
        item.strip()
        for value in headers.getall(_UPGRADE, [])
        for item in value.split(",")
        if item.strip()
    ]
    kept = [item for item in offered if protocol_names([item])[0] in allowed]
    return ", ".join(kept) if kept else None


def switch_accepted(asked: str, answered: list[str]) -> bool:
    """Does a 101's ``Upgrade`` name only protocols that were asked for (at least one)?"""
    names = protocol_names(answered)
    return bool(names) and set(names) <= set(protocol_names([asked]))


@dataclass(frozen=True, slots=True)
class ProtocolSwitch:
    """A request that may switch protocols: what to ask upstream, how long to idle."""

    protocols: str
    """The ``Upgrade`` value sent upstream (only protocols the route allows)."""
    idle_timeout_s: float

    @classmethod
    def requested(
        cls, request: web.BaseRequest, allowed: frozenset[str], idle_timeout_s: float
    ) -> ProtocolSwitch | None:
        """The switch ``request`` asks for on a route allowing ``allowed``, or None."""
        protocols = forwarded_protocols(
            request.method,
            request.version == HttpVersion11,
            request.body_exists,
            request.headers,
            allowed,
        )
        return None if protocols is None else cls(protocols, idle_timeout_s)

    def apply(self, headers: CIMultiDict[str]) -> None:
        """Add the upgrade request to headers built by ``upstream_request_headers``."""
        headers[_CONNECTION] = "Upgrade"
        headers[_UPGRADE] = self.protocols

    async def run(
        self,
        request: web.BaseRequest,
        resp: Response,
        *,
        via: str,
        server: str,
        exchange: Exchange,
    ) -> web.StreamResponse:
        """Answer the client 101 from the upstream's ``resp``, then relay until done.

        A 101 to a protocol that was not asked for raises UpstreamProtocolError (502)."""
        answered = resp.headers.getall(_UPGRADE, [])
        if not switch_accepted(self.protocols, answered):
            resp.close()
            raise UpstreamProtocolError(
                "the upstream switched to a protocol the request did not ask for"
            )
        if not isinstance(resp, UpstreamResponse):  # the config allows upgrades only on lean
            resp.close()
            raise UpstreamProtocolError("this upstream client cannot switch protocols")
        transport, tail = resp.detach()
        try:
            headers = downstream_response_headers(resp.headers, via=via)
            headers.popall(_CONTENT_LENGTH, None)
            headers[_CONNECTION] = "Upgrade"
            headers[_UPGRADE] = ", ".join(answered)
            if "Server" not in headers:
                headers["Server"] = server
            out = web.StreamResponse(
                status=SWITCHING_PROTOCOLS, reason=resp.reason, headers=headers
            )
            out.force_close()
            await out.prepare(request)
        except BaseException:
            transport.abort()
            raise
        exchange.switched = True
        await _Relay(request, transport, self.idle_timeout_s).run(tail)
        return out


class _Relay:
    """Bytes both ways between the client's aiohttp connection and a switched upstream."""

    def __init__(
        self, request: web.BaseRequest, upstream: asyncio.Transport, idle_timeout_s: float
    ) -> None:
        client = request.transport
        if client is None:
            raise ConnectionResetError("the client closed the connection")
        self._loop = asyncio.get_running_loop()
        self._request = request
        self._protocol = request.protocol
        self._client: asyncio.Transport = client
        self._upstream = upstream
        self._idle_timeout_s = idle_timeout_s
        self._last_activity_s = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._drainer: asyncio.Task[None] | None = None
        self.done: asyncio.Future[None] = self._loop.create_future()
        self.bytes_up = 0
        self.bytes_down = 0

    async def run(self, tail: bytes) -> None:
        """Relay until either side closes; cancelled (client gone, or shutdown): the
        upstream is closed too, and the cancellation goes on."""
        upstream = self._upstream
        upstream.set_protocol(_UpstreamSide(self))
        if tail:
            self.to_client(tail)
        if upstream.is_closing():  # the upstream closed right after its 101
            self._finish()
        else:
            # aiohttp's own slot for a switched connection: the client's bytes, those
            # already buffered first, go to feed_data; connection_lost calls feed_eof.
            self._protocol.set_parser(cast(Any, _ClientFeed(self)))
            self._protocol.keep_alive(False)
            upstream.resume_reading()
            self._timer = self._loop.call_at(
                self._last_activity_s + self._idle_timeout_s, self._idle_fired
            )
        try:
            await self.done
        except BaseException:
            self._close_upstream(abort=not self._client.is_closing())
            raise
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            drainer = self._drainer
            if drainer is not None and not drainer.done():
                drainer.cancel()

    # -- the directions -------------------------------------------------------

    def to_client(self, data: bytes) -> None:
        self.bytes_down += len(data)
        self._last_activity_s = self._loop.time()
        client = self._client
        if client.is_closing():
            return
        client.write(data)
        if self._protocol.writing_paused and self._drainer is None:
            # The client reads slowly: stop reading the upstream until it drains.
            self._upstream.pause_reading()
            self._drainer = self._loop.create_task(self._drain(), name="upgrade-drain")

    async def _drain(self) -> None:
        try:
            await self._request.writer.drain()
        except ConnectionError:
            return  # the client is gone: feed_eof ends the relay
        finally:
            self._drainer = None
        self._last_activity_s = self._loop.time()
        if not self._upstream.is_closing():
            self._upstream.resume_reading()

    def to_upstream(self, data: bytes) -> None:
        self.bytes_up += len(data)
        self._last_activity_s = self._loop.time()
        if not self._upstream.is_closing():
            self._upstream.write(data)

    def pause_client(self) -> None:
        if not self._client.is_closing():
            self._client.pause_reading()

    def resume_client(self) -> None:
        self._last_activity_s = self._loop.time()
        if not self._client.is_closing():
            self._client.resume_reading()

    # -- endings ----------------------------------------------------------------

    def client_closed(self) -> None:
        """The client's connection is gone: close the upstream once it is flushed."""
        self._close_upstream(abort=False)
        self._finish()

    def upstream_closed(self, exc: Exception | None) -> None:
        """The upstream closed (or reset): the client's connection closes when the
        handler returns (aiohttp closes it after the flush); a reset is passed on."""
        if exc is not None and not self._client.is_closing():
            self._client.abort()
        self._finish()

    def _idle_fired(self) -> None:
        deadline_s = self._last_activity_s + self._idle_timeout_s
        if self._loop.time() < deadline_s:
            self._timer = self._loop.call_at(deadline_s, self._idle_fired)
            return
        self._timer = None
        self._close_upstream(abort=True)
        if not self._client.is_closing():
            self._client.abort()
        self._finish()

    def _close_upstream(self, *, abort: bool) -> None:
        upstream = self._upstream
        if not upstream.is_closing():
            if abort:
                upstream.abort()
            else:
                upstream.close()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class _UpstreamSide(asyncio.Protocol):
    """The switched upstream connection's protocol."""

    def __init__(self, relay: _Relay) -> None:
        self._relay = relay

    def data_received(self, data: bytes) -> None:
        self._relay.to_client(data)

    def eof_received(self) -> bool:
        return False  # close: the relay ends when either side does

    def connection_lost(self, exc: Exception | None) -> None:
        self._relay.upstream_closed(exc)

    def pause_writing(self) -> None:
        self._relay.pause_client()

    def resume_writing(self) -> None:
        self._relay.resume_client()


class _ClientFeed:
    """What aiohttp's server protocol calls with the client's bytes after the switch
    (the interface of its WebSocketReader: ``feed_data`` → (eof, tail), ``feed_eof``)."""

    def __init__(self, relay: _Relay) -> None:
        self._relay = relay

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self._relay.to_upstream(data)
        return False, b""

    def feed_eof(self) -> None:
        self._relay.client_closed()
