"""The rig every hostile test runs against: a fake IdP, two capture upstreams and the
proxy in-process, plus the checks that apply after every hostile exchange."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiohttp import web

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
    exchange,
)

OTHER_TOKEN = SENTINEL_TOKEN + "-other"
API = "api.example.com"
"""Routed to upstream ``a`` with client ``svc`` (token SENTINEL_TOKEN)."""
OTHER = "other.example.com"
"""Routed to upstream ``b`` with client ``other`` (token OTHER_TOKEN)."""
BEARER = f"Bearer {SENTINEL_TOKEN}".encode()
OTHER_BEARER = f"Bearer {OTHER_TOKEN}".encode()
NEEDLES = (SENTINEL_SECRET.encode(), SENTINEL_TOKEN.encode())
"""Never in a response to the client nor in a log line (OTHER_TOKEN contains the token)."""

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
    token_requests: list[str]

    @property
    def port(self) -> int:
        return self.proxy.server.proxy_port

    @property
    def requests(self) -> list[CapturedRequest]:
        """Everything either upstream received."""
        return self.a.requests + self.b.requests

    def reset(self) -> None:
        self.a.reset()
        self.b.reset()

    async def send(self, data: bytes, **kwargs: float | bool) -> Reply:
        reply = await exchange(self.port, data, **kwargs)  # type: ignore[arg-type]
        self.assert_no_leak(reply)
        return reply

    def assert_no_leak(self, reply: Reply | None = None) -> None:
        logs = self.proxy.logs.getvalue().encode()
        for needle in NEEDLES:
            assert needle not in logs, f"{needle!r} is in the proxy's logs"
            if reply is not None:
                assert needle not in reply.raw, f"{needle!r} was sent back to the client"

    async def assert_still_serves(self) -> None:
        """A fresh connection with a plain request still works end to end."""
        before = len(self.a.requests)
        reply = await exchange(
            self.port,
            f"GET http://{API}/still-alive HTTP/1.1\r\nHost: {API}\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        self.assert_no_leak(reply)
        assert reply.statuses == [200], reply
        assert reply.error is None, reply.error
        assert len(self.a.requests) == before + 1
        last = self.a.requests[-1]
        assert last.target == b"/still-alive"
        assert_clean_upstream_request(last)


def assert_clean_upstream_request(
    request: CapturedRequest,
    *,
    bearer: bytes = BEARER,
    also_absent: tuple[str, ...] = (),
) -> None:
    """What every routed request must look like when it reaches the upstream."""
    assert request.complete, "the upstream got a truncated request"
    assert request.header("Authorization") == [bearer], request.headers
    names = request.names()
    for name in names:
        assert name not in HOP_BY_HOP, f"hop-by-hop {name!r} reached the upstream"
        assert not name.startswith(b"proxy-"), f"{name!r} reached the upstream"
    for name in also_absent:
        assert name.lower().encode() not in names, f"{name!r} reached the upstream"
    lengths = request.header("Content-Length")
    codings = request.header("Transfer-Encoding")
    assert not (lengths and codings), "both Content-Length and Transfer-Encoding upstream"
    assert len(lengths) <= 1, lengths
    if lengths:
        assert lengths == [str(len(request.body)).encode()], (lengths, request.body)
    if codings:
        assert codings == [b"chunked"], codings
    if not lengths and not codings:
        assert request.body == b""
    assert len(request.header("Host")) == 1


def routes_text(a: CaptureUpstream, b: CaptureUpstream, idp: str, proxy_extra: str = "") -> str:
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
"""


@asynccontextmanager
async def running_rig(proxy_extra: str = "") -> AsyncIterator[Rig]:
    token_requests: list[str] = []

    async def idp(request: web.Request) -> web.Response:
        token_requests.append(request.path)
        return token_answer(OTHER_TOKEN if request.path.endswith("/b") else SENTINEL_TOKEN)

    async with (
        fake_server(idp) as idp_server,
        capture_upstream() as a,
        capture_upstream() as b,
        running_proxy(routes_text(a, b, idp_server.url, proxy_extra)) as proxy,
    ):
        yield Rig(proxy, a, b, token_requests)
