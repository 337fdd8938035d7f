"""The relayed-whole fast path (response_head.py) against aiohttp's StreamResponse path.

Both run through ``Forwarder._stream_back`` with the same upstream response and a
real aiohttp StreamWriter over a transport that records the bytes; the only switch
is whether ``relayed_head`` may answer. The bytes must be the same (one clock for Date).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from aiohttp import HttpVersion, HttpVersion10, HttpVersion11, web_response
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_writer import StreamWriter
from aiohttp.test_utils import make_mocked_request
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from m2m_proxy import forward, response_head
from m2m_proxy.forward import Exchange, Forwarder
from m2m_proxy.response_head import relayed_head

VIA = "1.1 m2m-proxy"
SERVER = "m2m-proxy"
NOW = "Fri, 27 Nov 2026 04:00:00 GMT"


class _Transport:
    """Records what is written; never closing."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.data += data
        self.writes += 1

    def writelines(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.data += chunk
        self.writes += 1

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, _name: str, default: Any = None) -> Any:
        return default

    def abort(self) -> None:
        raise AssertionError("a whole response never aborts the client connection")


@dataclass
class _WholeResponse:
    """An upstream response whose body has arrived whole (the Response protocol)."""

    status: int
    reason: str | None
    headers: CIMultiDictProxy[str]
    body: bytes
    read: bool = field(default=False)

    async def readany(self) -> bytes:
        if self.read:
            return b""
        self.read = True
        return self.body

    def received_all(self) -> bool:
        return True

    def at_eof(self) -> bool:
        return self.read

    def release(self) -> None:
        return None

    def close(self) -> None:
        return None


@dataclass(frozen=True)
class Case:
    method: str
    version: HttpVersion
    keep_alive: bool
    status: int
    reason: str | None
    fields: list[tuple[str, str]]
    body: bytes


async def _relay(case: Case) -> tuple[bytes, Any]:
    """What the client is sent for ``case``, and the response object aiohttp gets."""
    data, response, _writes = await _relay_counted(case)
    return data, response


async def _relay_counted(case: Case) -> tuple[bytes, Any, int]:
    """:func:`_relay`, and how many writes reached the transport."""
    loop = asyncio.get_running_loop()
    transport = _Transport()
    protocol = BaseProtocol(loop)
    protocol.connection_made(cast(Any, transport))
    writer = StreamWriter(protocol, loop)
    request = make_mocked_request(
        case.method,
        "/",
        version=case.version,
        writer=writer,
        transport=transport,
    )
    # make_mocked_request closes every HTTP/1.0 request; a keep-alive one is wanted too.
    request._message = request._message._replace(should_close=not case.keep_alive)
    upstream = _WholeResponse(
        case.status, case.reason, CIMultiDictProxy(CIMultiDict(case.fields)), case.body
    )
    forwarder = Forwarder(cast(Any, None), cast(Any, None), via=SERVER)
    out = await forwarder._stream_back(request, upstream, VIA, Exchange(started=0.0))
    # What aiohttp does with the handler's response (web_protocol.finish_response).
    await out.prepare(request)
    await out.write_eof()
    return bytes(transport.data), out, transport.writes


async def _both_paths(case: Case, monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, Any, bytes]:
    # One Date for both paths: the clock may tick between them.
    monkeypatch.setattr(web_response, "rfc822_formatted_time", lambda: NOW)
    monkeypatch.setattr(response_head, "rfc822_formatted_time", lambda: NOW)
    fast, response = await _relay(case)
    with monkeypatch.context() as patch:
        patch.setattr(forward, "relayed_head", lambda **_kw: None)
        slow, _ = await _relay(case)
    return fast, response, slow


def _eligible(case: Case) -> bool:
    lengths = [v for n, v in case.fields if n.lower() == "content-length"]
    return (
        case.method != "HEAD" and case.status not in (204, 304) and lengths == [str(len(case.body))]
    )


_NAMES = st.sampled_from(
    [
        "Content-Type",
        "content-type",
        "X-Request-Id",
        "Cache-Control",
        "Server",
        "Date",
        "ETag",
        "Set-Cookie",
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Foo",
        "X-Proxy-Note",
        "Transfer-Encoding",
        "Upgrade",
        "Trailer",
    ]
)
_VALUES = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20).map(str.strip)
_CONNECTION_VALUES = st.sampled_from(
    ["keep-alive", "close", "X-Request-Id", "Server, Date", "content-type", "Content-Length"]
)


@st.composite
def cases(draw: Callable[..., Any]) -> Case:
    body = draw(st.binary(max_size=300))
    fields: list[tuple[str, str]] = []
    for name in draw(st.lists(_NAMES, max_size=8)):
        value = draw(_CONNECTION_VALUES if name == "Connection" else _VALUES)
        fields.append((name, value))
    length = draw(st.sampled_from(["right", "right", "right", "none", "wrong", "twice"]))
    if length != "none":
        fields.insert(draw(st.integers(0, len(fields))), ("Content-Length", str(len(body))))
    if length == "wrong":
        fields[[n for n, _ in fields].index("Content-Length")] = ("Content-Length", "9999")
    if length == "twice":
        fields.append(("Content-Length", str(len(body))))
    return Case(
        method=draw(st.sampled_from(["GET", "POST", "HEAD", "DELETE"])),
        version=draw(st.sampled_from([HttpVersion10, HttpVersion11])),
        keep_alive=draw(st.booleans()),
        status=draw(st.sampled_from([200, 201, 204, 301, 304, 401, 404, 500, 503, 599])),
        reason=draw(st.sampled_from([None, "OK", "", "Custom Reason"])),
        fields=fields,
        body=body,
    )


@settings(max_examples=300, deadline=None)
@given(cases())
def test_the_fast_path_sends_what_the_stream_response_path_sends(case: Case) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        fast, response, slow = asyncio.run(_both_paths(case, monkeypatch))
    assert fast == slow
    assert b"\r\nDate: " in fast  # the upstream's, or one the proxy added
    # The fast path is taken whenever it applies (else this test compares nothing).
    assert isinstance(response, forward._RelayedResponse) == _eligible(case)
    assert response.keep_alive == case.keep_alive


def test_a_common_response_is_one_write_with_via_server_and_date() -> None:
    case = Case(
        "GET",
        HttpVersion11,
        True,
        200,
        "OK",
        [("Content-Type", "application/json"), ("Content-Length", "2")],
        b"{}",
    )
    fast, response, writes = asyncio.run(_relay_counted(case))
    assert writes == 1
    head, _, body = fast.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[:5] == [
        b"HTTP/1.1 200 OK",
        b"Content-Type: application/json",
        b"Content-Length: 2",
        b"Via: 1.1 m2m-proxy",
        b"Server: m2m-proxy",
    ]
    assert lines[5].startswith(b"Date: ") and len(lines) == 6
    assert body == b"{}"
    assert isinstance(response, forward._RelayedResponse)
    assert response.status == 200 and response.prepared


def test_obs_text_in_an_upstream_value_reaches_the_client_unchanged() -> None:
    value = b"caf\xe9 \xc3\xa9".decode("utf-8", "surrogateescape")
    case = Case(
        "GET", HttpVersion11, True, 200, "OK", [("X-Text", value), ("Content-Length", "0")], b""
    )
    fast, _ = asyncio.run(_relay(case))
    assert b"\r\nX-Text: caf\xe9 \xc3\xa9\r\n" in fast


@pytest.mark.parametrize("bad", ["a\r\nX-Injected: 1", "a\nb", "a\rb"])
def test_cr_or_lf_in_any_text_declines_the_fast_path(bad: str) -> None:
    def head(**changes: Any) -> bytes | None:
        args: dict[str, Any] = {
            "http10": False,
            "keep_alive": True,
            "method": "GET",
            "status": 200,
            "reason": "OK",
            "upstream": CIMultiDict([("Content-Length", "0")]),
            "body_length": 0,
            "via": VIA,
            "server": SERVER,
        }
        return relayed_head(**(args | changes))

    assert head() is not None
    assert head(upstream=CIMultiDict([("X-A", bad), ("Content-Length", "0")])) is None
    assert head(upstream=CIMultiDict([(bad, "v"), ("Content-Length", "0")])) is None
    assert head(reason=bad) is None
    assert head(via=bad) is None
