"""SessionUpstream: the upstream client on aiohttp ClientSessions (``upstream_client:
aiohttp``), and the one place aiohttp client errors are translated.

Two pools, built by app.py: routed upstreams, and everything else through a session
whose resolver enforces the egress policy.
"""

from __future__ import annotations

import re
import ssl

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from m2m_proxy.egress import DestinationBlockedError
from m2m_proxy.errors import (
    DestinationDeniedError,
    NotSupportedError,
    ProxyError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
    UpstreamTlsError,
    UpstreamUnreachableError,
)
from m2m_proxy.upstream.connection import RequestBody


class SessionResponse:
    """An aiohttp ClientResponse behind the Response interface."""

    __slots__ = ("_resp",)

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp

    @property
    def status(self) -> int:
        return self._resp.status

    @property
    def reason(self) -> str | None:
        return self._resp.reason

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self._resp.headers

    async def readany(self) -> bytes:
        try:
            return await self._resp.content.readany()
        except TimeoutError as exc:
            raise UpstreamTimeoutError("the upstream did not answer in time") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamProtocolError(
                f"the upstream closed or broke the exchange ({type(exc).__name__})"
            ) from exc

    def received_all(self) -> bool:
        return self._resp.content.is_eof()

    def at_eof(self) -> bool:
        return self._resp.content.at_eof()

    def release(self) -> None:
        self._resp.release()

    def close(self) -> None:
        self._resp.close()


_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
"""Bytes RFC 9110 §5.5 forbids in a field value (HTAB is allowed); aiohttp's client
parser lets them through, and writing them to the client would fail mid-response."""


def _check_head(resp: aiohttp.ClientResponse) -> None:
    """Refuse what the lean client's parser refuses: a protocol switch nobody asked
    for (the proxy never forwards Upgrade) and control bytes in a header value."""
    if resp.status == 101:
        resp.close()
        raise UpstreamProtocolError("the upstream switched protocols unasked (101)")
    if any(_CONTROL.search(value) for _name, value in resp.raw_headers):
        resp.close()
        raise UpstreamProtocolError("the upstream sent a control character in a header")


class SessionUpstream:
    def __init__(
        self, session: aiohttp.ClientSession, guarded_session: aiohttp.ClientSession
    ) -> None:
        """``guarded_session`` carries requests no route names (its resolver enforces
        the egress policy)."""
        self._session = session
        self._guarded = guarded_session

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
    ) -> SessionResponse:
        if "Upgrade" in headers:  # the config check refuses upgrades with this client
            raise NotSupportedError("protocol upgrades need proxy.upstream_client: lean")
        if content_length is not None:
            headers["Content-Length"] = str(content_length)
        session = self._guarded if guarded else self._session
        try:
            resp = await session.request(
                method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                chunked=None,
                ssl=ssl if ssl is not None else True,
            )
        except ProxyError:
            raise
        except aiohttp.ClientConnectorCertificateError as exc:
            raise UpstreamTlsError("the upstream's TLS certificate failed verification") from exc
        except aiohttp.ClientSSLError as exc:
            raise UpstreamTlsError("TLS with the upstream failed") from exc
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, DestinationBlockedError):
                raise DestinationDeniedError(str(exc.os_error)) from None
            raise UpstreamUnreachableError(
                f"cannot connect to the upstream ({exc.strerror or 'connection failed'})"
            ) from exc
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeoutError("the upstream did not answer in time") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamProtocolError(
                f"the upstream closed or broke the exchange ({type(exc).__name__})"
            ) from exc
        _check_head(resp)
        return SessionResponse(resp)

    async def close(self) -> None:
        await self._session.close()
        await self._guarded.close()
