"""The proxy listener's HTTP server: aiohttp's low-level ``web.Server`` whose
connection handler answers unparseable requests with our problem+json.

Connections decrypted inside an intercepted tunnel get the same handler, carrying a
``tunnel`` (:class:`~m2m_proxy.target.TunnelOrigin`) that the request handler reads
from ``request.protocol``; they are tracked by this server like any other, so shutdown
covers them.

aiohttp's default error page echoes the offending request line or header back
(and its server logger logs it); a header may carry a credential, so here the
client only learns the status and a fixed reason, and the log only the fact.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from m2m_proxy.errors import BadRequestError, ProxyError, render_problem
from m2m_proxy.logs import Logger
from m2m_proxy.target import TunnelOrigin

_REASONS = {
    400: "the request is not valid HTTP/1.1",
    413: "the request is too large",
    414: "the request target is too long",
    431: "the request headers are too large",
    500: "the proxy failed to handle the request",
    504: "the proxy's request handler timed out",
}


class _ParseErrorProblem(ProxyError):
    """The client's bytes could not be parsed; status comes from aiohttp's parser."""

    code = "bad_request"
    proxy_status = "http_request_error"
    title = BadRequestError.title


class ProblemRequestHandler(web.RequestHandler):
    """RequestHandler whose error responses are problem+json with no echo."""

    def __init__(
        self,
        manager: web.Server,
        *,
        proxy_name: str,
        log: Logger,
        tunnel: TunnelOrigin | None = None,
        header_timeout_s: float | None = None,
        **kwargs: Any,
    ):
        super().__init__(manager, **kwargs)
        self._proxy_name = proxy_name
        self._log = log
        self.tunnel = tunnel
        """Set for a connection decrypted inside an intercepted tunnel."""
        self._header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None
        self._awaiting_headers = True
        self._head_started: float | None = None
        """Loop time of the first byte of a request head still incomplete, else None."""

    def data_received(self, data: bytes) -> None:
        """The first bytes of a request start its header clock (slowloris guard).

        The clock is lazy, as aiohttp's keep-alive timer is: a request only notes when
        its head started; the connection's one timer, armed when none is pending,
        checks at the deadline and re-arms for a newer head. Under keep-alive load
        that is one timer per connection per ``header_timeout_s``, not one per request.
        """
        if self._awaiting_headers and self._head_started is None and self._header_timeout_s:
            loop = asyncio.get_running_loop()
            self._head_started = started = loop.time()
            if self._header_timer is None:
                self._header_timer = loop.call_at(
                    started + self._header_timeout_s, self._header_deadline
                )
        super().data_received(data)

    def headers_received(self) -> None:
        """Called by the request handler: the request's head is complete."""
        self._awaiting_headers = False
        self._head_started = None

    def request_done(self) -> None:
        """Called by the request handler: the next bytes start a new request."""
        self._awaiting_headers = True

    def _header_deadline(self) -> None:
        self._header_timer = None
        started, timeout = self._head_started, self._header_timeout_s
        if started is None or not timeout:
            return  # no head in progress: the next one arms the timer again
        loop = asyncio.get_running_loop()
        if loop.time() < started + timeout:
            self._header_timer = loop.call_at(started + timeout, self._header_deadline)
            return
        self._log.info("request_rejected", status=408, reason="header_timeout")
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(
                b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
            )
            transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        tunnel = self.tunnel
        if tunnel is not None:
            sni = getattr(transport.get_extra_info("ssl_object"), "m2m_server_name", None)
            if sni is not None and sni.lower().rstrip(".") != tunnel.host:
                self.tunnel = tunnel._replace(sni_mismatch=True)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the response had started; the connection is dropped")
        status = parse_error_status(exc, status)
        self._log.info(
            "request_rejected",
            status=status,
            reason=type(exc).__name__ if exc is not None else "handler_error",
        )
        error = _ParseErrorProblem(_REASONS.get(status, "the request could not be handled"))
        error.status = status
        if status >= 500:
            error.code = "internal_error"
            error.proxy_status = "proxy_internal_error"
        _, headers, body = render_problem(error, self._proxy_name)
        response = web.Response(status=status, headers=headers, body=body)
        response.headers["Server"] = self._proxy_name
        response.force_close()
        return response


_REQUEST_LINE = re.compile(r"[A-Za-z]+ \S|/|https?://")


def parse_error_status(exc: BaseException | None, status: int) -> int:
    """The precise status for a parser error: 414 for an over-long request line, 431 for
    an over-long header or too many headers (aiohttp says 400 for all of them)."""
    if isinstance(exc, LineTooLong):
        line = exc.args[0] if exc.args else b""
        text = bytes(line).decode("latin-1") if isinstance(line, bytes | bytearray) else str(line)
        return 414 if _REQUEST_LINE.match(text) else 431
    if isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc):
        return 431
    return status


class FrontDoor(web.Server):
    """``web.Server`` building :class:`ProblemRequestHandler` per connection."""

    def __init__(
        self,
        handler: Any,
        *,
        proxy_name: str,
        log: Logger,
        header_timeout_s: float | None = None,
        **kwargs: Any,
    ) -> None:
        # Request bodies are relayed as sent: never decompressed (a gzip bomb would
        # otherwise be inflated on the way, and the label would no longer match).
        kwargs.setdefault("auto_decompress", False)
        super().__init__(handler, **kwargs)
        self._proxy_name = proxy_name
        self._log = log
        self._header_timeout_s = header_timeout_s

    def __call__(self) -> web.RequestHandler:
        return ProblemRequestHandler(
            self,
            proxy_name=self._proxy_name,
            log=self._log,
            header_timeout_s=self._header_timeout_s,
            loop=self._loop,
            **self._kwargs,
        )

    def tunnel_protocol(self, tunnel: TunnelOrigin) -> web.RequestHandler:
        """The HTTP protocol for the decrypted side of an intercepted tunnel."""
        return ProblemRequestHandler(
            self,
            proxy_name=self._proxy_name,
            log=self._log,
            tunnel=tunnel,
            header_timeout_s=self._header_timeout_s,
            loop=self._loop,
            **self._kwargs,
        )
