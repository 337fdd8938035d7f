"""UpstreamResponse: the response head of one exchange and the reading of its body.

A view of the :class:`~m2m_proxy.upstream.connection.Connection` that received it; once
the exchange is released (the connection may serve another), it only says "ended".
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from multidict import CIMultiDictProxy

from m2m_proxy.errors import UpstreamProtocolError

if TYPE_CHECKING:
    from m2m_proxy.upstream.connection import Connection


class UpstreamResponse:
    """Status, reason and headers of a response; the body is read with ``readany``."""

    __slots__ = ("_conn", "_ended", "headers", "reason", "status")

    def __init__(
        self, conn: Connection, status: int, reason: str, headers: CIMultiDictProxy[str]
    ) -> None:
        self._conn = conn
        self._ended = False
        self.status = status
        self.reason = reason
        self.headers = headers

    async def readany(self) -> bytes:
        """The body bytes received so far (waiting for some if none); b"" at the end.

        Raises UpstreamTimeoutError, or UpstreamProtocolError for a body the upstream
        broke off (what arrived before the break is returned first)."""
        conn = self._conn
        while True:
            if conn.response is not self:
                if self._ended:
                    return b""
                raise UpstreamProtocolError("the response was released before its end")
            body = conn.body
            if body:
                return conn.take()
            if conn.error is not None:
                raise conn.error
            if conn.complete:
                self._ended = True
                conn.release()
                return b""
            await conn.wait_body()

    def received_all(self) -> bool:
        """True when the whole body has arrived: reading it will not wait."""
        conn = self._conn
        if conn.response is not self:
            return self._ended
        return conn.complete and conn.error is None

    def at_eof(self) -> bool:
        """True when the body has been read to its end (``readany`` would give b"")."""
        conn = self._conn
        if conn.response is not self:
            return self._ended
        return conn.complete and not conn.body and conn.error is None

    def release(self) -> None:
        """Done with the response: back to the pool if reusable, else closed."""
        if self._conn.response is self:
            self._conn.release()

    def detach(self) -> tuple[asyncio.Transport, bytes]:
        """After a 101 the request asked for: the raw connection and the bytes already
        received after the head; the connection never returns to the pool."""
        if self._conn.response is not self:
            raise UpstreamProtocolError("the response was released before the switch")
        self._ended = True
        return self._conn.detach()

    def close(self) -> None:
        """Abandon the response: the connection is closed."""
        if self._conn.response is self:
            self._conn.abort()
