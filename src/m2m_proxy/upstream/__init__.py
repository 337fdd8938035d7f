"""Upstream HTTP/1.1 clients: the lean keep-alive pool and the aiohttp one.

The lean client: ``pool.py`` (UpstreamPool), ``connection.py`` (Connection, one
connection as an asyncio Protocol with the llhttp parser), ``response.py``
(UpstreamResponse), ``body.py`` (the streamed request body) and ``head.py`` (its pure
wire rules). ``session.py`` wraps aiohttp ClientSessions behind the same
``interface.py``.
"""

from m2m_proxy.upstream.connection import RequestBody
from m2m_proxy.upstream.interface import Response, Upstream
from m2m_proxy.upstream.pool import UpstreamPool
from m2m_proxy.upstream.response import UpstreamResponse
from m2m_proxy.upstream.session import SessionUpstream

__all__ = [
    "RequestBody",
    "Response",
    "SessionUpstream",
    "Upstream",
    "UpstreamPool",
    "UpstreamResponse",
]
