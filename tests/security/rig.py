"""The rig every hostile test runs against: a fake IdP, capture upstreams and the proxy
in-process, plus the checks that apply after every hostile exchange.

Routes (``unmatched: deny``):

- ``api.example.com`` → upstream ``a``, client ``svc``, token ``SENTINEL_TOKEN``;
- ``other.example.com`` → upstream ``b``, client ``other``, token ``OTHER_TOKEN``;
- with ``tunnel=True``: ``127.0.0.1:<port of c>`` with ``https: tunnel`` (a blind
  CONNECT tunnel straight to capture ``c``).
"""

from __future__ import annotations

import json
import typing
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from aiohttp import web

from m2m_proxy.config.schema import ProxySection
from tests.functional.support import (
    SENTINEL_SECRET,
    SENTINEL_TOKEN,
    RunningProxy,
    fake_server,
    running_proxy,
    token_answer,
)
from tests.security.capture import (
    CapturedRequest,
    CaptureUpstream,
    Reply,
    capture_upstream,
    default_responder,
    exchange,
)

OTHER_TOKEN = SENTINEL_TOKEN + "-other"
API = "api.example.com"
OTHER = "other.example.com"
BEARER = f"Bearer {SENTINEL_TOKEN}".encode()
OTHER_BEARER = f"Bearer {OTHER_TOKEN}".encode()
NEEDLES = (SENTINEL_SECRET.encode(), SENTINEL_TOKEN.encode())
"""Never in a response to the client nor in a log line (OTHER_TOKEN contains the token)."""


def upstream_clients() -> list[str]:
    """The proxy's upstream HTTP clients (``proxy.upstream_client``), read from the
    schema so the suite follows it; ``[""]`` (the only one) when there is no choice."""
    field = ProxySection.model_fields.get("upstream_client")
    choices = [str(c) for c in typing.get_args(field.annotation)] if field else []
    return choices or [""]


def each_upstream_client() -> list[typing.Any]:
    """pytest params (``pytest.param``), one per upstream client."""
    return [pytest.param(client, id=client or "default") for client in upstream_clients()]


def client_setting(client: str) -> str:
    """The ``proxy:`` line choosing ``client`` (nothing for the default)."""
    return f"  upstream_client: {client}\n" if client else ""


HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)


@dataclass
class Rig:
    proxy: RunningProxy
    a: CaptureUpstream
    b: CaptureUpstream
    c: CaptureUpstream | None
    token_requests: list[str]
    upstream_client: str = ""

    @property
    def port(self) -> int:
        return self.proxy.server.proxy_port

    @property
    def upstreams(self) -> list[CaptureUpstream]:
        return [u for u in (self.a, self.b, self.c) if u is not None]

    @property
    def requests(self) -> list[CapturedRequest]:
        """Everything any upstream received."""
        return [r for u in self.upstreams for r in u.requests]

    @property
    def upstream_connections(self) -> int:
        return sum(len(u.connections) for u in self.upstreams)

    def reset(self) -> None:
        for upstream in self.upstreams:
            upstream.reset()

    async def send(
        self, data: bytes, *, quiet_s: float = 0.2, timeout_s: float = 10.0, head_only: bool = False
    ) -> Reply:
        """One connection: write ``data``, collect the answer; checked for leaks."""
        reply = await exchange(
            self.port, data, quiet_s=quiet_s, timeout_s=timeout_s, head_only=head_only
        )
        self.assert_no_leak(reply)
        return reply

    def assert_no_leak(self, reply: Reply | None = None) -> None:
        logs = self.proxy.logs.getvalue().encode()
        for needle in NEEDLES:
            assert needle not in logs, f"{needle!r} is in the proxy's logs"
            if reply is not None:
                assert needle not in reply.raw, f"{needle!r} was sent back to the client"

    def assert_upstream_clean(self) -> None:
        """Whatever reached an upstream parsed as HTTP/1.1 and looks like a routed request."""
        for upstream in self.upstreams:
            assert upstream.errors == [], upstream.errors
        for request in self.a.requests:
            assert_clean_upstream_request(request, bearer=BEARER)
        for request in self.b.requests:
            assert_clean_upstream_request(request, bearer=OTHER_BEARER)

    async def assert_still_serves(self) -> None:
        """A fresh connection with a plain request still works end to end (``a`` is
        given back its default answer first)."""
        self.a.responder = default_responder
        before = len(self.a.requests)
        reply = await self.send(
            f"GET http://{API}/still-alive HTTP/1.1\r\nHost: {API}\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        assert reply.error is None, reply.error
        assert reply.statuses == [200], reply
        assert len(self.a.requests) == before + 1
        last = self.a.requests[-1]
        assert last.target == b"/still-alive"
        assert_clean_upstream_request(last)
        self.assert_no_leak()

    async def refused(
        self,
        data: bytes,
        status: int | tuple[int, ...] = 400,
        *,
        closes: bool | None = True,
        code: str | None = None,
        not_echoed: bytes | None = None,
    ) -> Reply:
        """``data`` gets one refusal, nothing reaches (or even connects to) an upstream,
        and the proxy still serves afterwards."""
        reply = await self.send(data)
        statuses = (status,) if isinstance(status, int) else status
        assert reply.error is None, (reply.error, reply.raw[:300])
        assert len(reply.responses) == 1, reply.statuses
        assert reply.status in statuses, (reply.status, reply.raw[:300])
        assert reply.versions[0] in (b"1.0", b"1.1"), reply.versions
        if closes is True:
            assert reply.closed, "the proxy kept the connection after a framing error"
        if code is not None:
            assert problem_code(reply) == code, reply.responses[0].body
        if not_echoed is not None:
            assert not_echoed not in reply.raw, "the refusal echoes the request"
        assert self.requests == [], [r.target for r in self.requests]
        assert self.upstream_connections == 0, "an upstream connection was opened"
        await self.assert_still_serves()
        return reply

    async def forwarded(
        self,
        data: bytes,
        *,
        target: bytes = b"/p",
        body: bytes = b"",
        to: str = "a",
        also_absent: tuple[str, ...] = (),
    ) -> CapturedRequest:
        """``data`` is forwarded once, exactly, with the route's token, and answered 200."""
        reply = await self.send(data)
        assert reply.error is None, (reply.error, reply.raw[:300])
        assert reply.statuses == [200], (reply.statuses, reply.raw[:300])
        assert reply.versions == [b"1.1"], reply.versions
        upstream, bearer = (self.a, BEARER) if to == "a" else (self.b, OTHER_BEARER)
        others = [r.target for r in self.requests if r not in upstream.requests]
        assert others == [], f"another upstream got {others}"
        assert len(upstream.requests) == 1, [r.target for r in upstream.requests]
        request = upstream.requests[0]
        assert request.target == target, request.target
        assert bytes(request.body) == body, (bytes(request.body[:100]), len(request.body))
        assert_clean_upstream_request(request, bearer=bearer, also_absent=also_absent)
        self.assert_upstream_clean()
        await self.assert_still_serves()
        return request


def problem_code(reply: Reply) -> str:
    document = json.loads(reply.responses[0].body)
    assert isinstance(document, dict)
    return str(document["code"])


def assert_clean_upstream_request(
    request: CapturedRequest,
    *,
    bearer: bytes = BEARER,
    also_absent: tuple[str, ...] = (),
) -> None:
    """What every routed request must look like when it reaches the upstream."""
    assert request.complete, "the upstream got a truncated request"
    assert request.http_version == b"1.1", request.http_version
    assert request.header("Authorization") == [bearer], request.headers
    names = request.names()
    for name in names:
        assert name not in HOP_BY_HOP, f"hop-by-hop {name!r} reached the upstream"
        assert not name.startswith(b"proxy-"), f"{name!r} reached the upstream"
    for absent in also_absent:
        assert absent.lower().encode() not in names, f"{absent!r} reached the upstream"
    lengths = request.header("Content-Length")
    codings = request.header("Transfer-Encoding")
    assert not (lengths and codings), "both Content-Length and Transfer-Encoding upstream"
    assert len(lengths) <= 1, lengths
    if lengths:
        assert lengths == [str(len(request.body)).encode()], (lengths, len(request.body))
    if codings:
        assert codings == [b"chunked"], codings
    if not lengths and not codings:
        assert request.body == b""
    assert request.trailers == [], request.trailers
    assert len(request.header("Host")) == 1


def routes_text(
    a: CaptureUpstream,
    b: CaptureUpstream,
    c: CaptureUpstream | None,
    idp: str,
    proxy_extra: str = "",
) -> str:
    tunnel = (
        f"  - host: 127.0.0.1:{c.port}\n    client: svc\n    https: tunnel\n"
        if c is not None
        else ""
    )
    return f"""
proxy:
  unmatched: deny
  idle_timeout_s: 5
  log_level: debug
{proxy_extra}
clients:
  svc:
    token_url: {idp}/token/a
    client_id: svc
    client_secret: ${{SENTINEL_SECRET}}
  other:
    token_url: {idp}/token/b
    client_id: other
    client_secret: ${{SENTINEL_SECRET}}
routes:
  - host: {API}
    client: svc
    upstream: {a.url}
  - host: {OTHER}
    client: other
    upstream: {b.url}
{tunnel}"""


@asynccontextmanager
async def running_rig(
    *, tunnel: bool = False, proxy_extra: str = "", upstream_client: str = ""
) -> AsyncIterator[Rig]:
    """``proxy_extra``: more lines for the ``proxy:`` section, indented by two spaces;
    ``upstream_client``: which upstream HTTP client (empty: the default)."""
    token_requests: list[str] = []

    async def idp(request: web.Request) -> web.Response:
        token_requests.append(request.path)
        return token_answer(OTHER_TOKEN if request.path.endswith("/b") else SENTINEL_TOKEN)

    async with (
        fake_server(idp) as idp_server,
        capture_upstream() as a,
        capture_upstream() as b,
        capture_upstream() as c,
    ):
        third = c if tunnel else None
        async with running_proxy(routes_text(a, b, third, idp_server.url, proxy_extra)) as proxy:
            yield Rig(proxy, a, b, third, token_requests)
