"""A hostile upstream: malformed, ambiguous or over-long responses, extra bytes after a
response. Run once per upstream HTTP client (``proxy.upstream_client``).

The client either gets a well-formed response whose framing matches what it carries, or
a 502, or a connection cut before a complete response; never a header the proxy could
not parse passed on verbatim, and never bytes of one exchange in the next one (a pooled
upstream connection that desynchronised would hand the next request a stale answer).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from aiohttp import web

from tests.functional.support import RunningProxy, fake_server, running_proxy, token_answer
from tests.security.capture import (
    CUT,
    CapturedRequest,
    RawUpstream,
    Reply,
    exchange,
    raw_upstream,
)
from tests.security.rig import API, BEARER, NEEDLES, client_setting, each_upstream_client

FRESH = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh"


@dataclass
class Hostile:
    proxy: RunningProxy
    upstream: RawUpstream

    async def get(self, path: str) -> Reply:
        reply = await exchange(
            self.proxy.server.proxy_port,
            f"GET http://{API}{path} HTTP/1.1\r\nHost: {API}\r\n\r\n".encode(),
            timeout_s=4,
        )
        for needle in NEEDLES:
            assert needle not in reply.raw
        return reply


@asynccontextmanager
async def hostile(client: str, first: bytes) -> AsyncIterator[Hostile]:
    """The first request is answered with ``first``, every later one with FRESH."""
    answered: list[bytes] = []

    def script(_request: CapturedRequest) -> bytes:
        answered.append(first if not answered else FRESH)
        return answered[-1]

    async def idp(_request: web.Request) -> web.Response:
        return token_answer()

    async with fake_server(idp) as idp_server, raw_upstream(script) as upstream:
        text = f"""
proxy:
  idle_timeout_s: 2
{client_setting(client)}
clients:
  svc:
    token_url: {idp_server.url}/token
    client_id: svc
    client_secret: ${{SENTINEL_SECRET}}
routes:
  - host: {API}
    client: svc
    upstream: {upstream.url}
"""
        async with running_proxy(text) as proxy:
            yield Hostile(proxy, upstream)


async def assert_next_exchange_is_clean(box: Hostile) -> None:
    """A second request gets the upstream's fresh answer, not leftovers of the first."""
    reply = await box.get("/second")
    assert reply.error is None, reply.error
    assert [(r.status, r.body) for r in reply.responses] == [(200, b"fresh")], reply.raw[:300]
    assert [r.target for r in box.upstream.requests] == [b"/first", b"/second"]
    for request in box.upstream.requests:
        assert request.header("Authorization") == [BEARER]


def assert_refused_or_cut(reply: Reply) -> None:
    """502, or a connection cut before any complete response."""
    if reply.responses:
        assert reply.error is None, reply.error
        assert reply.statuses == [502], reply.raw[:400]
    else:
        assert reply.closed
        assert reply.error in (None, CUT), reply.error


STALE_AFTER = {
    "a second response after the body": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nSTOLEN!"
    ),
    "204 with a body": b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\nSTOLEN!",
    "304 followed by a response": (
        b"HTTP/1.1 304 Not Modified\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nSTOLEN!"
    ),
    "body longer than Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokSTOLEN!",
}


@pytest.mark.parametrize("client", each_upstream_client())
@pytest.mark.parametrize("first", [pytest.param(v, id=k) for k, v in STALE_AFTER.items()])
async def test_extra_bytes_from_the_upstream_never_reach_the_next_request(
    client: str, first: bytes
) -> None:
    async with hostile(client, first) as box:
        reply = await box.get("/first")
        assert b"STOLEN" not in reply.raw
        if reply.statuses != [502]:
            assert reply.error is None, reply.error
            assert len(reply.responses) == 1
        await assert_next_exchange_is_clean(box)


AMBIGUOUS = {
    "Content-Length and Transfer-Encoding": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n"
    ),
    "two Content-Lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nokk",
    "negative Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok",
    "bad chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
    "body shorter than Content-Length": b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok",
    "NUL in a header value": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    "bare CR in a header": (
        b"HTTP/1.1 200 OK\r\nX-A: a\rSet-Cookie: evil=1\r\nContent-Length: 2\r\n\r\nok"
    ),
    "bare CR after the status line": (
        b"HTTP/1.1 200 OK\rSet-Cookie: evil=1\r\nContent-Length: 2\r\n\r\nok"
    ),
    "space in a header name": b"HTTP/1.1 200 OK\r\nX Injected: 1\r\nContent-Length: 2\r\n\r\nok",
    "control character in a header name": (
        b"HTTP/1.1 200 OK\r\nX\x01Y: 1\r\nContent-Length: 2\r\n\r\nok"
    ),
    "four-digit status": b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",
    "100 KB header": b"HTTP/1.1 200 OK\r\nX-Big: "
    + b"a" * 100_000
    + b"\r\nContent-Length: 2\r\n\r\nok",
}


@pytest.mark.parametrize("client", each_upstream_client())
@pytest.mark.parametrize("first", [pytest.param(v, id=k) for k, v in AMBIGUOUS.items()])
async def test_malformed_upstream_response_is_refused_not_relayed(
    client: str, first: bytes
) -> None:
    async with hostile(client, first) as box:
        reply = await box.get("/first")
        assert b"evil=1" not in reply.raw
        assert_refused_or_cut(reply)
        await assert_next_exchange_is_clean(box)


@pytest.mark.parametrize("client", each_upstream_client())
async def test_header_with_space_before_colon_is_not_relayed(client: str) -> None:
    """The lean client once used 'Content-Length : 7' for framing and relayed it verbatim
    next to its own Transfer-Encoding: chunked."""
    first = b"HTTP/1.1 200 OK\r\nContent-Length : 7\r\n\r\nokSTOLEN"
    async with hostile(client, first) as box:
        reply = await box.get("/first")
        assert b"Content-Length :" not in reply.raw, reply.raw[:300]
        assert_refused_or_cut(reply)
        await assert_next_exchange_is_clean(box)


@pytest.mark.parametrize(
    "client",
    each_upstream_client(),
)
async def test_control_character_in_an_upstream_value_is_a_502(client: str) -> None:
    first = b"HTTP/1.1 200 OK\r\nX-A: a\x7fb\r\nContent-Length: 2\r\n\r\nok"
    async with hostile(client, first) as box:
        reply = await box.get("/first")
        assert reply.statuses in ([502], [200]), reply.raw[:300]
        if reply.statuses == [200]:
            assert b"\x7f" not in reply.raw


@pytest.mark.parametrize(
    "client",
    each_upstream_client(),
)
async def test_unrequested_protocol_switch_is_a_502(client: str) -> None:
    first = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"\r\nRAW-TUNNEL-DATA"
    )
    async with hostile(client, first) as box:
        reply = await box.get("/first")
        assert reply.statuses == [502], reply.raw[:300]
        assert b"RAW-TUNNEL-DATA" not in reply.raw
        await assert_next_exchange_is_clean(box)


INFORMATIONAL = {
    "100 Continue": b"HTTP/1.1 100 Continue\r\n\r\n",
    "103 Early Hints": b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n",
    "two 1xx": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n",
}


@pytest.mark.parametrize("client", each_upstream_client())
@pytest.mark.parametrize("interim", [pytest.param(v, id=k) for k, v in INFORMATIONAL.items()])
async def test_interim_responses_are_followed_by_the_final_one(client: str, interim: bytes) -> None:
    async with hostile(client, interim + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok") as box:
        reply = await box.get("/first")
        assert reply.error is None, reply.error
        assert reply.responses[-1].status == 200
        assert reply.responses[-1].body == b"ok"
        await assert_next_exchange_is_clean(box)


@pytest.mark.parametrize("client", each_upstream_client())
async def test_obs_fold_and_bare_lf_in_upstream_headers_are_normalised(client: str) -> None:
    first = b"HTTP/1.1 200 OK\nX-A: one\r\n two\r\nContent-Length: 2\r\n\r\nok"
    async with hostile(client, first) as box:
        reply = await box.get("/first")
        assert reply.error is None, reply.error
        if reply.statuses == [200]:
            [response] = reply.responses
            assert all(b"\r" not in v and b"\n" not in v for _, v in response.headers)
            assert response.body == b"ok"
        else:
            assert reply.statuses == [502]
        await assert_next_exchange_is_clean(box)
