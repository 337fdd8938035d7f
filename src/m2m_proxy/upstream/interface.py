"""What the Forwarder needs from an upstream client; two implement it.

:class:`~m2m_proxy.upstream.pool.UpstreamPool` (``upstream_client: lean``) and
:class:`~m2m_proxy.upstream.session.SessionUpstream` (``upstream_client: aiohttp``).
Both raise only the project's errors (Upstream*Error, DestinationDeniedError,
LoopDetectedError, and a ProxyError the request body itself raised).
"""

from __future__ import annotations

import ssl
from typing import Protocol

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from m2m_proxy.upstream.connection import RequestBody


class Response(Protocol):
    """A response whose head has arrived; its body is read with ``readany``."""

    @property
    def status(self) -> int: ...

    @property
    def reason(self) -> str | None: ...

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    async def readany(self) -> bytes:
        """Some body bytes, b"" at the end; Upstream*Error if the body broke off."""
        ...

    def received_all(self) -> bool:
        """True when the whole body has arrived: reading it will not wait."""
        ...

    def at_eof(self) -> bool:
        """True when the body has been read to its end (``readany`` would give b"")."""
        ...

    def release(self) -> None:
        """Done: the connection is reused if the exchange ended cleanly."""

    def close(self) -> None:
        """Abandon the response and its connection."""


class Upstream(Protocol):
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
    ) -> Response:
        """Send the request; ``content_length`` None with a body means chunked;
        ``ssl`` verifies an https upstream (None: the system store); ``guarded``
        requests go only where the egress policy allows."""
        ...

    async def close(self) -> None:
        """Close every connection (at shutdown)."""
