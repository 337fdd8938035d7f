"""One keep-alive HTTP/1.1 connection to an upstream, on asyncio Protocol callbacks.

One exchange at a time, never pipelined: the pool hands a connection out, the
request goes out, the response head comes back as an :class:`UpstreamResponse`,
and the body is read from it. ``release()`` returns the connection to the pool
only when the request was fully sent, the response fully received, and both sides
allow keep-alive; in every other case the connection is closed, so no byte of one
exchange can ever be read as part of the next.

The response is parsed by llhttp (httptools) with two of aiohttp's leniencies (bare
LF line ends, spaces after a chunk size) but strict header fields. Flow control both
ways: reading pauses while more than ``HIGH_WATER`` body bytes wait for the consumer,
and a streamed request body waits for ``drain`` when the upstream reads slowly. A
silence of ``read_timeout_s`` while waiting on the upstream (head, body, or drain) fails
the exchange with UpstreamTimeoutError.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterable, Callable
from typing import NamedTuple, cast

import aiohttp
import httptools
from multidict import CIMultiDictProxy, istr

from m2m_proxy.errors import (
    ProxyError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
)
from m2m_proxy.tasks import TaskSet
from m2m_proxy.upstream.body import send_stream
from m2m_proxy.upstream.head import (
    CRLF,
    LAST_CHUNK,
    MAX_FIELD_BYTES,
    MAX_HEAD_BYTES,
    HeadRejectedError,
    chunk_prefix,
    chunked_last,
    persistent,
    response_fields,
)
from m2m_proxy.upstream.response import UpstreamResponse

HIGH_WATER = 128 * 1024
"""Unread body bytes at which reading from the upstream pauses (aiohttp: 2 x 64 KiB)."""
_CONNECTION = istr("Connection")
_CONTENT_LENGTH = istr("Content-Length")
_TRANSFER_ENCODING = istr("Transfer-Encoding")
_COALESCE = 64 * 1024
"""A buffered request body up to this size goes out in one write with its head."""

RequestBody = bytes | aiohttp.StreamReader | AsyncIterable[bytes] | None


class PoolKey(NamedTuple):
    """What makes two connections interchangeable."""

    scheme: str
    host: str
    port: int
    tls: ssl.SSLContext | None
    """Compared by identity: a context with a client certificate is its own pool."""
    guarded: bool
    """Connected to an address the egress policy allowed."""


class ClosedBeforeResponseError(UpstreamProtocolError):
    """The connection ended before any byte of a response: on a reused connection,
    the upstream closed it while idle, and the pool may retry (see pool.py)."""


def _new_parser(conn: Connection) -> httptools.HttpResponseParser:
    parser = httptools.HttpResponseParser(conn)
    # Two of aiohttp's three leniencies (outside its debug mode): bare LF line ends and
    # spaces after a chunk size. Not its lenient_headers: that lets llhttp take
    # "Content-Length : 7" (whitespace before the colon, RFC 9112 §5.1), obs-fold and
    # control characters in values, which a proxy must refuse (502), not relay.
    parser.set_dangerous_leniencies(
        lenient_optional_cr_before_lf=True,
        lenient_spaces_after_chunk_size=True,
    )
    return parser


class Connection(asyncio.Protocol):
    """The protocol of one upstream connection; the pool owns it."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        key: PoolKey,
        *,
        read_timeout_s: float,
        tasks: TaskSet,
        on_idle: Callable[[Connection], None],
        on_lost: Callable[[Connection], None],
    ) -> None:
        self._loop = loop
        self.key = key
        self._read_timeout_s = read_timeout_s
        self._tasks = tasks
        self._on_idle = on_idle
        self._on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = loop.create_future()
        """Done when the transport is gone (connection_lost)."""
        self.lost = False
        self.reused = False
        """An exchange already completed on this connection before the current one."""
        self.idle = False
        self.idle_since = 0.0
        self._parser = _new_parser(self)
        self.write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._progress_at = 0.0
        # The current exchange.
        self._active = False
        self._head_request = False
        self._upgrade = False
        """The request asked for a protocol switch: a 101 ends the exchange (switched)."""
        self.switched = False
        self._tail: list[bytes] = []
        self._sent = False
        self._writer: asyncio.Task[None] | None = None
        self._head_waiter: asyncio.Future[None] | None = None
        self._body_waiter: asyncio.Future[None] | None = None
        self.response: UpstreamResponse | None = None
        self.received_any = False
        self._head_bytes = 0
        self._interim = False
        self._reason = b""
        self._raw: list[bytes] = []
        self._keep_alive = False
        self._until_close = False
        self.complete = False
        self.error: UpstreamError | ProxyError | None = None
        self.body: list[bytes] = []
        self._buffered = 0
        self._reading_paused = False

    # --- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self._active or self.complete:
            if self.switched:  # the new protocol's bytes, kept for whoever takes over
                self._hold(data)
                return
            # Bytes nobody asked for (idle), or after the response ended: a peer that
            # talks out of turn is not trusted with another request.
            self._keep_alive = False
            if not self._active:
                self._close_transport()
            return
        self.received_any = True
        if self._timer is not None:
            self._progress_at = self._loop.time()
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if self.complete:  # bytes after the response: closed at release
                self._keep_alive = False
                if self.switched and isinstance(exc, httptools.HttpParserUpgrade):
                    self._hold(data[exc.args[0] :])
                return
            cause = exc.__context__
            if isinstance(cause, UpstreamError):
                self._fail(cause)
            else:
                self._fail(UpstreamProtocolError(f"the upstream sent an invalid response ({exc})"))
            return
        if self.response is None and not self.error:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._fail(
                    UpstreamProtocolError(
                        f"the upstream's response head is over {MAX_HEAD_BYTES} bytes"
                    )
                )

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost sorts out what it means

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._disarm()
        if self._active and self.error is None:
            if self.response is None:
                if self.received_any:
                    self._fail(
                        UpstreamProtocolError(
                            "the upstream closed the connection in the middle of the response head"
                        )
                    )
                else:
                    self._fail(
                        ClosedBeforeResponseError(
                            "the upstream closed the connection before answering"
                        )
                    )
            elif not self.complete:
                if self._until_close and exc is None:
                    self.complete = True  # the body was delimited by the close
                    self._wake_body()
                else:
                    self._fail(
                        UpstreamProtocolError(
                            "the upstream closed the connection before the response body "
                            "was complete"
                        )
                    )
        drain = self._drain_waiter
        if drain is not None and not drain.done():
            self._drain_waiter = None
            drain.set_exception(ConnectionResetError("the upstream closed the connection"))
        if not self.closed.done():
            self.closed.set_result(None)
        self._on_lost(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._progress_at = self._loop.time()
        drain = self._drain_waiter
        if drain is not None:
            self._drain_waiter = None
            if not drain.done():
                drain.set_result(None)

    # --- httptools callbacks -------------------------------------------------------

    def on_status(self, data: bytes) -> None:
        self._reason += data
        if len(self._reason) > MAX_FIELD_BYTES:
            raise HeadRejectedError(f"the upstream's status line is over {MAX_FIELD_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        # Called once per field: only collect; on_headers_complete judges them at once.
        self._raw += (name, value)

    def on_headers_complete(self) -> None:
        if self.complete:
            raise HeadRejectedError("the upstream sent a second response")
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                if self._upgrade:
                    self._switch(parser)
                    return
                raise HeadRejectedError(
                    "the upstream switched protocols (101), which the proxy never asks for"
                )
            # 100 Continue, 102, 103 Early Hints: skipped, as aiohttp's client does.
            self._interim = True
            self._reason = b""
            self._raw = []
            return
        fields = response_fields(self._raw, len(self._reason))
        headers = CIMultiDictProxy(fields)
        if self._head_request:
            # llhttp cannot be told that a HEAD response has no body: the exchange ends
            # here, and the connection gets a fresh parser if it is reused.
            self._keep_alive = persistent(
                parser.get_http_version(), headers.getall(_CONNECTION, ())
            )
            self.complete = True
        else:
            self._keep_alive = parser.should_keep_alive()
            if status not in (204, 304):
                # llhttp's rule for responses: Transfer-Encoding wins over Content-Length;
                # chunked if it is the last coding, else the body runs to the close.
                if _TRANSFER_ENCODING in fields:
                    te = ",".join(fields.getall(_TRANSFER_ENCODING))
                    self._until_close = not chunked_last(te)
                else:
                    self._until_close = _CONTENT_LENGTH not in fields
        self.response = UpstreamResponse(
            self, status, self._reason.decode("utf-8", "surrogateescape"), headers
        )
        waiter = self._head_waiter
        if waiter is not None:
            self._head_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _switch(self, parser: httptools.HttpResponseParser) -> None:
        """A 101 to a request that asked for it: the exchange ends with this head, and
        the connection is the new protocol's, for :meth:`detach` (never pooled)."""
        fields = response_fields(self._raw, len(self._reason))
        self.switched = self.complete = True
        self._keep_alive = False
        if self.transport is not None:
            self.transport.pause_reading()
        self.response = UpstreamResponse(
            self, 101, self._reason.decode("utf-8", "surrogateescape"), CIMultiDictProxy(fields)
        )
        waiter = self._head_waiter
        if waiter is not None:
            self._head_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _hold(self, data: bytes) -> None:
        if data:
            self._tail.append(data)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def detach(self) -> tuple[asyncio.Transport, bytes]:
        """After a 101: the transport (reading paused) and the bytes that came after the
        head. The connection leaves the pool for good; the caller owns the transport
        (``set_protocol``) and must close it."""
        transport = self.transport
        if not self.switched or transport is None:
            raise RuntimeError("only a switched connection can be detached")
        self._disarm()
        self._active = False
        self.response = None
        self._on_lost(self)  # the pool forgets it: never handed out, nor closed by it
        tail = b"".join(self._tail)
        self._tail.clear()
        return transport, tail

    def on_body(self, data: bytes) -> None:
        if self.complete:  # a HEAD response with a body: the framing is off
            self._keep_alive = False
            return
        self.body.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._reading_paused and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake_body()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if not self.complete:
            self.complete = True
            self._wake_body()

    # --- the exchange --------------------------------------------------------------

    async def exchange(
        self,
        head: bytes,
        body: RequestBody,
        *,
        content_length: int | None,
        chunked: bool,
        head_request: bool,
        upgrade: bool = False,
    ) -> UpstreamResponse:
        """Send one request and wait for its response head; ``upgrade``: the request
        asks for a protocol switch, and a 101 may answer it (see :meth:`detach`)."""
        transport = self.transport
        if transport is None or self._active or self.idle:
            raise RuntimeError("a connection serves one exchange at a time, out of the pool")
        self._active = True
        self._head_request = head_request
        self._upgrade = upgrade
        waiter = self._head_waiter = self._loop.create_future()
        if body is None:
            transport.write(head)
            self.request_sent()
        elif isinstance(body, bytes):
            if chunked:
                body = chunk_prefix(len(body)) + body + CRLF + LAST_CHUNK if body else LAST_CHUNK
            if len(body) <= _COALESCE:
                transport.write(head + body)
            else:
                transport.write(head)
                transport.write(body)
            self.request_sent()
        else:
            transport.write(head)
            self._writer = self._tasks.start(
                send_stream(self, body, content_length, chunked), name="upstream-body"
            )
        try:
            await waiter
        except BaseException:
            self._head_waiter = None
            self.abort()
            raise
        return cast(UpstreamResponse, self.response)

    def request_sent(self) -> None:
        self._sent = True
        self._writer = None
        if self.response is None:
            self._arm()

    def abandon_request(self, exc: ProxyError) -> None:
        """The body could not be sent whole: fail the exchange unless the upstream has
        already answered (then the answer stands, and the connection is not reused)."""
        self._writer = None
        if self.response is None:
            self._fail(exc)
        else:
            self._keep_alive = False

    async def drain(self) -> None:
        """Wait until the upstream has read enough of what was written."""
        waiter = self._drain_waiter = self._loop.create_future()
        self._arm()
        await waiter

    def take(self) -> bytes:
        """Everything buffered, at once; reading resumes if it was paused."""
        body = self.body
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self._buffered = 0
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    async def wait_body(self) -> None:
        waiter = self._body_waiter = self._loop.create_future()
        self._arm()
        await waiter

    def _wake_body(self) -> None:
        waiter = self._body_waiter
        if waiter is not None:
            self._body_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def release(self) -> None:
        """End the exchange: back to the pool when everything allows it, else close."""
        if not self._active:
            return
        self._active = False
        self._disarm()
        writer = self._writer
        if writer is not None and not writer.done():
            writer.cancel()
            self._sent = False
        if not (
            self.complete
            and self._sent
            and self._keep_alive
            and self.error is None
            and not self.lost
            and self.transport is not None
            and not self.transport.is_closing()
        ):
            self.response = None
            self._close_transport(abort=True)
            return
        self._reset()
        self.reused = True
        self._on_idle(self)

    def _reset(self) -> None:
        if self._head_request:
            self._parser = _new_parser(self)  # llhttp still expects the HEAD body
        self._head_request = self._sent = self.complete = self._upgrade = False
        self._writer = self._head_waiter = self._body_waiter = None
        self.response = None
        self.received_any = self._interim = False
        self._head_bytes = 0
        self._reason = b""
        self._raw = []
        self._keep_alive = self._until_close = False
        self.body.clear()
        self._buffered = 0
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        """Close now (RST); whatever the exchange was waiting for fails."""
        self.response = None
        if self._active:
            self._active = False
            writer = self._writer
            if writer is not None and not writer.done():
                writer.cancel()
            self._disarm()
        self._close_transport(abort=True)

    def close(self) -> None:
        """Close gracefully (a TLS close_notify first): at shutdown or idle expiry."""
        self._close_transport(abort=False)

    def _close_transport(self, *, abort: bool = True) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if abort:
                transport.abort()
            else:
                transport.close()

    # --- failures and timeouts -----------------------------------------------------

    def _fail(self, exc: UpstreamError | ProxyError) -> None:
        """The exchange cannot go on: every waiter sees ``exc``; the connection closes."""
        if self.error is None:
            self.error = exc
        self._disarm()
        for waiter in (self._head_waiter, self._body_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_exception(exc)
        self._head_waiter = self._body_waiter = None
        writer = self._writer
        if writer is not None and not writer.done() and writer is not asyncio.current_task():
            writer.cancel()
        self._close_transport(abort=True)

    def _arm(self) -> None:
        """A wait on the upstream starts: silence counts from now (the timer, started
        unless it runs, re-arms itself to the last progress when it fires)."""
        self._progress_at = now = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(now + self._read_timeout_s, self._timer_fired)

    def _disarm(self) -> None:
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()

    def _waiting(self) -> bool:
        return (
            self._drain_waiter is not None
            or self._body_waiter is not None
            or (self._head_waiter is not None and self._sent)
        )

    def _timer_fired(self) -> None:
        self._timer = None
        if not self._active or not self._waiting():
            return  # the consumer is the slow side now; the next wait re-arms
        deadline = self._progress_at + self._read_timeout_s
        if deadline > self._loop.time():
            self._timer = self._loop.call_at(deadline, self._timer_fired)
            return
        self._fail(UpstreamTimeoutError("the upstream did not answer in time"))
