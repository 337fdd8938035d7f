"""Tunnel: the blind byte relay behind CONNECT (and TLS splicing).

Two protocols, one per socket, write what they receive straight into the other
side's transport: no task, no coroutine and no copy per chunk. Flow control is the
transports' own: when a side's write buffer passes its high-water mark
(``pause_writing``) the other side stops reading until it drains
(``resume_writing``), so a fast sender facing a slow receiver costs one bounded
write buffer, not memory that grows with the transfer.

How a tunnel ends::

    EOF from one side            write_eof() on the other; the other direction goes on
    EOF from both sides          close both once flushed     closed_by = the side that ended first
    reset or socket error        reset the other side now    closed_by = "error"
    nothing moved for idle_timeout_s    reset both          closed_by = "idle_timeout"
    abort() (proxy shutdown)     reset both                  closed_by = "aborted"

A reset is passed on as a reset (``SO_LINGER`` 0), never as a FIN: a FIN tells the
peer the stream ended cleanly, which for a close-delimited body would be a silently
truncated response.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

from m2m_proxy.errors import UpstreamTimeoutError, UpstreamUnreachableError

SideName = Literal["client", "upstream"]
ClosedBy = Literal["client", "upstream", "idle_timeout", "error", "aborted"]

_LINGER_RESET = struct.pack("ii", 1, 0)  # l_onoff=1, l_linger=0: close() sends RST


@dataclass(frozen=True, slots=True)
class RelayStats:
    bytes_up: int  # client -> upstream
    bytes_down: int  # upstream -> client
    duration_s: float
    closed_by: ClosedBy


class Tunnel:
    """An open upstream TCP connection waiting to be joined with a client socket.

    Made by ``connect()``; ``run()`` once, or ``abort()`` if it will never run.
    """

    def __init__(self) -> None:
        """Use ``Tunnel.connect()``."""
        self._loop = asyncio.get_running_loop()
        self._upstream = _Side(self, "upstream", self._loop)
        self._client = _Side(self, "client", self._loop)
        self._upstream.other = self._client
        self._client.other = self._upstream
        self._last_activity_s = 0.0  # loop time the last byte moved; written per chunk
        self._idle_timeout_s = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._first_eof: SideName | None = None
        self._closed_by: ClosedBy | None = None
        self._started = False

    @classmethod
    async def connect(cls, host: str, port: int, *, connect_timeout_s: float) -> Tunnel:
        """Open the upstream connection.

        Raises UpstreamUnreachableError (refused, DNS failure, unreachable) or
        UpstreamTimeoutError; messages name the host and port, nothing else.
        """
        tunnel = cls()
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            async with asyncio.timeout(connect_timeout_s):
                await tunnel._loop.create_connection(lambda: tunnel._upstream, host, port)
        except TimeoutError as exc:  # before OSError: TimeoutError is one (ETIMEDOUT too)
            raise UpstreamTimeoutError(
                f"timed out connecting to {authority} after {connect_timeout_s:g} s"
            ) from exc
        except OSError as exc:
            raise UpstreamUnreachableError(
                f"cannot connect to {authority} ({_describe(exc)})"
            ) from exc
        return tunnel

    @property
    def buffered_bytes(self) -> int:
        """Bytes the proxy holds for either direction: bounded by flow control."""
        held = sum(len(chunk) for chunk in self._upstream.held)
        return held + sum(
            side.transport.get_write_buffer_size()
            for side in (self._client, self._upstream)
            if side.transport is not None and not side.lost
        )

    async def run(self, client: socket.socket, *, idle_timeout_s: float) -> RelayStats:
        """Relay between ``client`` and the upstream until both directions are done.

        Takes ownership of the accepted, non-blocking client socket; bytes already
        waiting in it are relayed too. Returns once both sockets are closed.
        Cancelling it resets both sides and re-raises.
        """
        if self._started:
            raise RuntimeError("Tunnel.run() may be called only once")
        self._started = True
        loop = self._loop
        started_s = loop.time()
        if self.ended:  # aborted (or the upstream failed) before the client joined
            _reset_socket(client)
            self._reset(self._upstream)
            await self._upstream.closed
            return self._stats(started_s)
        self._idle_timeout_s = idle_timeout_s
        self._last_activity_s = started_s
        self._idle_timer = loop.call_at(started_s + idle_timeout_s, self._idle_fired)
        try:
            try:
                await loop.connect_accepted_socket(lambda: self._client, client)
            except OSError:
                self._closed_by = "error"
                _reset_socket(client)
                self._reset(self._upstream)
                await self._upstream.closed
                return self._stats(started_s)
            await self._upstream.closed
            await self._client.closed
        except BaseException:  # cancelled (or a bad socket): leave nothing open, re-raise
            if self._client.transport is None:
                _reset_socket(client)
            self._shut("aborted")
            raise
        finally:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
        return self._stats(started_s)

    def abort(self) -> None:
        """Reset both sides at once (proxy shutdown); run() returns closed_by='aborted'."""
        if not (self._upstream.lost and (self._client.lost or self._client.transport is None)):
            self._shut("aborted")

    @property
    def ended(self) -> bool:
        """Whether the tunnel has ended (its sockets may still be closing)."""
        return self._closed_by is not None

    # -- called by the sides --------------------------------------------------

    def _on_eof(self, side: _Side) -> None:
        if self._first_eof is None:
            self._first_eof = side.name
        other = side.other
        if other.transport is None:  # upstream EOF before the client joined: sent on join
            return
        if not other.lost and not other.transport.is_closing() and other.transport.can_write_eof():
            try:
                other.transport.write_eof()
            except OSError:  # the other side is already gone (its peer closed, then reset)
                self._end(self._first_eof)
                for each in (side, other):
                    if each.transport is not None and not each.lost:
                        each.transport.abort()
                return
        if other.eof:  # both directions done: close once the buffers are flushed
            self._end(self._first_eof)
            for each in (side, other):
                if each.transport is not None and not each.lost:
                    each.transport.close()

    def _on_lost(self, side: _Side, exc: Exception | None) -> None:
        other = side.other
        if exc is not None:
            self._end("error")
            self._reset(other)
        else:  # we closed or reset it, or the loop did: close the other side too
            self._end(side.name)
            if other.transport is not None and not other.lost:
                other.transport.close()

    def _idle_fired(self) -> None:
        deadline_s = self._last_activity_s + self._idle_timeout_s
        if self._loop.time() < deadline_s:  # bytes moved since it was armed: re-arm once
            self._idle_timer = self._loop.call_at(deadline_s, self._idle_fired)
        else:
            self._idle_timer = None
            self._shut("idle_timeout")

    # -- endings ----------------------------------------------------------------

    def _end(self, reason: ClosedBy) -> None:
        """Record why the tunnel ended, unless something already did."""
        if self._closed_by is None:
            self._closed_by = reason

    def _shut(self, reason: ClosedBy) -> None:
        """End the tunnel now, whatever it was doing: reset both sides."""
        self._closed_by = reason
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._reset(self._client)
        self._reset(self._upstream)

    @staticmethod
    def _reset(side: _Side) -> None:
        transport = side.transport
        if transport is None or side.lost:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _set_linger_reset(sock)
        transport.abort()

    def _stats(self, started_s: float) -> RelayStats:
        return RelayStats(
            bytes_up=self._client.received,
            bytes_down=self._upstream.received,
            duration_s=self._loop.time() - started_s,
            closed_by=self._closed_by or "error",
        )


class _Side(asyncio.Protocol):
    """One socket of a tunnel: what it receives is written to the other side's transport."""

    other: _Side

    def __init__(self, tunnel: Tunnel, name: SideName, loop: asyncio.AbstractEventLoop) -> None:
        self.tunnel = tunnel
        self.name: SideName = name
        self.clock = loop.time
        self.transport: asyncio.Transport | None = None
        self.forward: Callable[[bytes], object] = self._hold
        self.held: list[bytes] = []
        self.received = 0
        self.eof = False
        self.lost = False
        self.closed: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        other = self.other
        if other.transport is None:  # the upstream, before the client joins
            self.transport.pause_reading()  # uvloop ignores this here: _hold pauses again
            return
        if self.tunnel.ended:  # aborted, or the upstream failed, while the client was joining
            self.tunnel._reset(self)
            return
        # The client joins: link the two, then hand over what the upstream sent meanwhile.
        self.forward = other.transport.write
        other.forward = self.transport.write
        if not other.eof:
            other.transport.resume_reading()  # first, so pause_writing below can pause it again
        for chunk in other.held:
            self.transport.write(chunk)
        other.held.clear()
        if other.eof and self.transport.can_write_eof():
            self.transport.write_eof()

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        self.tunnel._last_activity_s = self.clock()
        self.forward(data)

    def _hold(self, data: bytes) -> None:
        """Keep what the upstream sends before the client joins, and stop reading."""
        self.held.append(data)
        if self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        if not self.eof:  # a resumed transport may report its EOF again
            self.eof = True
            self.tunnel._on_eof(self)
        return True  # keep the transport open: the other direction may still be going

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.tunnel._on_lost(self, exc)
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        peer = self.other.transport
        if peer is not None and not peer.is_closing():
            peer.pause_reading()

    def resume_writing(self) -> None:
        self.tunnel._last_activity_s = self.clock()  # the buffer drained: bytes moved
        peer = self.other.transport
        if peer is not None and not peer.is_closing():
            peer.resume_reading()


def _describe(exc: OSError) -> str:
    """The OS's words for a connect failure ("Connection refused"), never a peer's."""
    if isinstance(exc, socket.gaierror):
        return exc.strerror or "name resolution failed"
    if exc.errno:  # asyncio words refusals "Connect call failed (addr)"; use the OS's text
        return os.strerror(exc.errno)
    return exc.strerror or str(exc) or type(exc).__name__


def _set_linger_reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already dead: close() sends what the kernel has left
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def _reset_socket(sock: socket.socket) -> None:
    if sock.fileno() != -1:
        _set_linger_reset(sock)
    sock.close()
