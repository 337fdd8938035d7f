"""Forwarder: one request upstream with a credential, the 401 replay, the streaming.

The upstream side is an :class:`~m2m_proxy.upstream.Upstream` built by app.py: the
lean keep-alive pool (default) or aiohttp ClientSessions. Either sends the bytes
unchanged (no cookies, no decompression, no redirects) and raises only the
project's errors, so nothing here knows which one it talks to.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import HttpVersion10, HttpVersion11, web
from multidict import CIMultiDict
from yarl import URL

from m2m_proxy.errors import BodyStalledError, PayloadTooLargeError, UpstreamError
from m2m_proxy.headers import downstream_response_headers, upstream_request_headers
from m2m_proxy.response_head import relayed_head
from m2m_proxy.tokens.cache import TokenCache
from m2m_proxy.tokens.model import CredentialKey, Token
from m2m_proxy.upgrade import SWITCHING_PROTOCOLS, ProtocolSwitch
from m2m_proxy.upstream import Response, Upstream


@dataclass(slots=True)
class Exchange:
    """What happened to one request, for the access log and metrics."""

    started: float
    route: str = "-"
    token: str = "none"  # none | hit | refresh_ahead | miss
    replayed: str = "no"  # no | recovered | still_401 | not_replayable
    error: str = ""  # set when the exchange failed after the response started
    waited: float = 0.0
    """Seconds spent waiting for a token fetch or for upstream response headers."""
    responded: float = 0.0
    """When the response headers started back to the client (0: not yet)."""
    switched: bool = False
    """The client got a 101 and the connection is relaying another protocol."""


class Body:
    """The client's request body: buffered (replayable) or a one-shot stream."""

    __slots__ = ("data", "length", "stream")

    def __init__(
        self,
        data: bytes | None,
        stream: aiohttp.StreamReader | AsyncIterator[bytes] | None,
        length: int | None,
    ) -> None:
        self.data = data
        self.stream = stream
        self.length = length

    @property
    def replayable(self) -> bool:
        return self.stream is None

    @classmethod
    async def read(
        cls,
        request: web.BaseRequest,
        limit: int,
        max_bytes: int | None = None,
        stall_timeout_s: float | None = None,
    ) -> Body:
        """Buffer bodies up to ``limit`` bytes; stream larger or unknown-length ones.

        A chunked body is buffered while it stays under the limit; past it, what was
        read is sent first and the rest streams, so nothing the client sent is lost.
        A body over ``max_bytes`` raises PayloadTooLargeError: at once when its
        Content-Length says so (nothing is read, no 100 Continue is sent), else as
        soon as that many bytes went by. A client that sends nothing for
        ``stall_timeout_s`` while its body is unfinished raises BodyStalledError
        (408), whether the body is being buffered or streamed.
        """
        if not request.body_exists:
            return NO_BODY
        length = request.content_length
        content = request.content
        if length is not None and max_bytes is not None and length > max_bytes:
            raise PayloadTooLargeError(_too_large(max_bytes))
        if length is not None and length > limit:
            return cls(None, _stream([], content, 0, max_bytes, stall_timeout_s), length)
        head: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = await _next_chunk(content, stall_timeout_s)
            if not chunk:
                data = b"".join(head)
                return cls(data, None, len(data))
            head.append(chunk)
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                raise PayloadTooLargeError(_too_large(max_bytes))
        return cls(None, _stream(head, content, size, max_bytes, stall_timeout_s), None)

    def payload(self) -> bytes | aiohttp.StreamReader | AsyncIterator[bytes] | None:
        return self.data if self.stream is None else self.stream


NO_BODY = Body(None, None, None)
"""The body of every request without one (shared: a Body is never mutated)."""


async def _next_chunk(content: aiohttp.StreamReader, stall_timeout_s: float | None) -> bytes:
    """The client's next body bytes (b"" at the end); BodyStalledError when none come
    for ``stall_timeout_s``."""
    try:
        async with asyncio.timeout(stall_timeout_s):
            return await content.readany()
    except TimeoutError:
        raise BodyStalledError(
            f"no request body bytes arrived for {stall_timeout_s:g} s (body_timeout_s)"
        ) from None


async def _stream(
    head: list[bytes],
    rest: aiohttp.StreamReader,
    size: int,
    max_bytes: int | None,
    stall_timeout_s: float | None,
) -> AsyncIterator[bytes]:
    """``head``, then the rest of the client's body as it arrives, with its limits."""
    for chunk in head:
        yield chunk
    while chunk := await _next_chunk(rest, stall_timeout_s):
        size += len(chunk)
        if max_bytes is not None and size > max_bytes:
            raise PayloadTooLargeError(_too_large(max_bytes))
        yield chunk


def _too_large(max_bytes: int) -> str:
    return f"the request body is over {max_bytes} bytes (max_body_bytes)"


class _WholeBodyResponse(web.StreamResponse):
    """For a body that has already arrived whole: the head waits for it, and both go
    to the client in one write, as aiohttp's ``web.Response`` does. A plain
    StreamResponse sends its head at once, one more send() per request; that is what
    a body still on its way needs, so the client sees the head without waiting.
    (aiohttp's class attribute; if it ever goes away, this is a StreamResponse.)"""

    _send_headers_immediately = False


class _RelayedResponse(web.StreamResponse):
    """A response the proxy has already written whole (response_head.py): aiohttp's
    ``finish_response`` finds it sent, so its ``prepare`` and ``write_eof`` do
    nothing, and reads ``keep_alive`` from it. Its ``headers`` stay empty: what was
    sent is in the bytes. (aiohttp's private attributes: tests/unit/test_response_head.py
    runs aiohttp's prepare and write_eof after it and fails on any byte more, or on the
    wrong keep_alive; mutation-checked for both.)"""

    def __init__(self, status: int, reason: str | None, keep_alive: bool) -> None:
        super().__init__(status=status, reason=reason)
        self._keep_alive = keep_alive
        self._eof_sent = True


class Forwarder:
    def __init__(
        self,
        upstream: Upstream,
        tokens: TokenCache,
        *,
        via: str,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._clock = clock
        self._upstream = upstream
        self._tokens = tokens
        self._via = via
        self._via_by_version = {
            v: f"{v.major}.{v.minor} {via}" for v in (HttpVersion10, HttpVersion11)
        }

    async def forward(
        self,
        request: web.BaseRequest,
        *,
        url: URL,
        host: str,
        key: CredentialKey | None,
        body: Body,
        exchange: Exchange,
        tls: ssl.SSLContext | None = None,
        guarded: bool = False,
        switch: ProtocolSwitch | None = None,
    ) -> web.StreamResponse:
        """Send upstream (with a token when ``key`` is set), replay once on 401, stream back.

        ``tls`` verifies an https upstream (None: the system store); ``guarded``
        requests (no route names them) go only where the egress policy allows;
        ``switch``: the request asks for an allowed protocol upgrade (upgrade.py)."""
        via = self._via_by_version.get(request.version)
        if via is None:
            via = f"{request.version.major}.{request.version.minor} {self._via}"
        token: Token | None = None
        if key is not None:
            # The hot path: a dict lookup and a clock compare, no coroutine.
            token = self._tokens.peek(key)
            if token is not None:
                exchange.token = "hit"
            else:
                token = self._tokens.current(key)  # starts a background refresh if due
                if token is not None:
                    exchange.token = "refresh_ahead"
                else:
                    exchange.token = "miss"
                    waiting = self._clock()
                    token = await self._tokens.obtain(key)
                    exchange.waited += self._clock() - waiting
        waiting = self._clock()
        resp = await self._send(
            request,
            url=url,
            host=host,
            token=token,
            body=body,
            via=via,
            tls=tls,
            guarded=guarded,
            switch=switch,
        )
        exchange.waited += self._clock() - waiting
        if resp.status == 401 and key is not None and token is not None:
            self._tokens.invalidate(key, token)
            if body.replayable:
                resp.release()
                waiting = self._clock()
                token = await self._tokens.obtain(key)
                resp = await self._send(
                    request,
                    url=url,
                    host=host,
                    token=token,
                    body=body,
                    via=via,
                    tls=tls,
                    guarded=guarded,
                    switch=switch,
                )
                exchange.waited += self._clock() - waiting
                exchange.replayed = "still_401" if resp.status == 401 else "recovered"
            else:
                exchange.replayed = "not_replayable"
        exchange.responded = self._clock()
        if switch is not None and resp.status == SWITCHING_PROTOCOLS:
            return await switch.run(request, resp, via=via, server=self._via, exchange=exchange)
        return await self._stream_back(request, resp, via, exchange)

    def _send(
        self,
        request: web.BaseRequest,
        *,
        url: URL,
        host: str,
        token: Token | None,
        body: Body,
        via: str,
        tls: ssl.SSLContext | None,
        guarded: bool,
        switch: ProtocolSwitch | None = None,
    ) -> Coroutine[Any, Any, Response]:
        headers: CIMultiDict[str] = upstream_request_headers(
            request.headers,
            host=host,
            authorization=token.authorization if token is not None else None,
            via=via,
        )
        if switch is not None:
            switch.apply(headers)
        return self._upstream.request(
            request.method,
            url,
            headers,
            body.payload(),
            content_length=body.length,
            ssl=tls,
            guarded=guarded,
        )

    async def _stream_back(
        self,
        request: web.BaseRequest,
        resp: Response,
        via: str,
        exchange: Exchange,
    ) -> web.StreamResponse:
        """Copy status, headers and body to the client; backpressure via ``write``.

        If the upstream breaks off after the headers went out, the client connection
        is aborted so the client sees a truncated body, never a complete-looking one.
        """
        try:
            first = b""
            whole = resp.received_all()
            if whole:  # the common case: nothing to wait for, one write of our own
                first = await resp.readany()
                if resp.at_eof():
                    keep_alive = request.keep_alive
                    relayed = _RelayedResponse(resp.status, resp.reason, keep_alive)
                    head = relayed_head(
                        http10=request.version == HttpVersion10,
                        keep_alive=keep_alive,
                        method=request.method,
                        status=relayed.status,
                        reason=relayed.reason,  # aiohttp's phrase when the upstream gave none
                        upstream=resp.headers,
                        body_length=len(first),
                        via=via,
                        server=self._via,
                    )
                    if head is not None:
                        await request.writer.write(head + first if first else head)
                        return relayed
            kind = _WholeBodyResponse if whole else web.StreamResponse
            headers = downstream_response_headers(resp.headers, via=via)
            if "Server" not in headers:  # else aiohttp would add its own, with versions
                headers["Server"] = self._via
            out = kind(status=resp.status, reason=resp.reason, headers=headers)
            await out.prepare(request)
            chunk = first
            while True:
                if not chunk:
                    try:
                        chunk = await resp.readany()
                    except UpstreamError as exc:
                        # The aiohttp client's error keeps its name (ClientPayloadError, ...).
                        cause = exc.__cause__ if exc.__cause__ is not None else exc
                        exchange.error = f"upstream_truncated:{type(cause).__name__}"
                        if request.transport is not None:
                            request.transport.abort()
                        return out
                    if not chunk:
                        break
                if resp.at_eof():  # the last bytes (often all): one write with the head
                    await out.write_eof(chunk)
                    return out
                await out.write(chunk)
                chunk = b""
            await out.write_eof()
            return out
        except BaseException:
            resp.close()
            raise
        finally:
            resp.release()
