"""The request body task: a stream copied to the upstream with backpressure.

Runs beside the wait for the response head (an upstream may answer before it has read
everything); framing is checked against the announced length, and every failure of
the body's source becomes the client's error, never an upstream one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable
from typing import TYPE_CHECKING, cast

import aiohttp

from m2m_proxy.errors import BadRequestError, ProxyError
from m2m_proxy.upstream.head import CRLF, LAST_CHUNK, chunk_prefix

if TYPE_CHECKING:
    from m2m_proxy.upstream.connection import Connection


async def send_stream(
    conn: Connection,
    body: aiohttp.StreamReader | AsyncIterable[bytes],
    length: int | None,
    chunked: bool,
) -> None:
    """The body task: copy the stream upstream, waiting for drain; framing checked."""
    transport = cast(asyncio.Transport, conn.transport)
    chunks = body.iter_any() if isinstance(body, aiohttp.StreamReader) else body
    sent = 0
    try:
        async for chunk in chunks:
            if not chunk:
                continue
            sent += len(chunk)
            if length is not None and sent > length:
                raise BadRequestError("the request body is longer than its Content-Length")
            if conn.lost:
                return  # connection_lost has failed the exchange
            if chunked:
                transport.writelines((chunk_prefix(len(chunk)), chunk, CRLF))
            else:
                transport.write(chunk)
            if conn.write_paused:
                await conn.drain()
        if length is not None and sent != length:
            raise BadRequestError("the request body ended before its Content-Length")
        if chunked and not conn.lost:
            transport.write(LAST_CHUNK)
    except Exception as exc:  # each kind is translated by _body_failure
        if not conn.lost:  # else connection_lost has reported the upstream's end
            conn.abandon_request(_body_failure(exc))
        return
    if not conn.lost:
        conn.request_sent()


def _body_failure(exc: Exception) -> ProxyError:
    """The error a client gets when its request body could not be sent upstream."""
    if isinstance(exc, ProxyError):
        return exc  # e.g. PayloadTooLargeError from the body's own limit
    if isinstance(exc, OSError | aiohttp.ClientError | aiohttp.http_exceptions.HttpProcessingError):
        return BadRequestError(f"the request body could not be read ({type(exc).__name__})")
    return ProxyError(f"the request body could not be sent ({type(exc).__name__})")
