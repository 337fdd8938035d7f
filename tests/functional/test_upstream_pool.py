"""The lean upstream client against a scripted upstream: framing, keep-alive, retries.

What the upstream received is parsed by h11, so a request the pool framed wrongly
fails there, not only here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp.base_protocol import BaseProtocol
from multidict import CIMultiDict
from yarl import URL

from m2m_proxy.errors import BadRequestError, PayloadTooLargeError, UpstreamProtocolError
from m2m_proxy.upstream import UpstreamPool
from m2m_proxy.upstream.connection import RequestBody
from tests.functional.upstream_peer import Answer, Received, chunked, peer, response


def make_pool(**overrides: float) -> UpstreamPool:
    return UpstreamPool(
        connect_timeout_s=overrides.get("connect_timeout_s", 2.0),
        read_timeout_s=overrides.get("read_timeout_s", 5.0),
        egress=None,
        keepalive_s=overrides.get("keepalive_s", 30.0),
    )


async def fetch(
    pool: UpstreamPool,
    url: str,
    method: str = "GET",
    *,
    headers: dict[str, str] | None = None,
    body: RequestBody = None,
    length: int | None = None,
) -> tuple[int, CIMultiDict[str], bytes]:
    """One exchange, body read to the end; the connection goes back to the pool."""
    out: CIMultiDict[str] = CIMultiDict(headers or {})
    out.setdefault("Host", URL(url).authority)
    if isinstance(body, bytes) and length is None:
        length = len(body)
    resp = await pool.request(
        method, URL(url), out, body, content_length=length, ssl=None, guarded=False
    )
    data = bytearray()
    try:
        while chunk := await resp.readany():
            data += chunk
    finally:
        resp.release()
    return resp.status, CIMultiDict(resp.headers), bytes(data)


async def stream(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        await asyncio.sleep(0)
        yield chunk


def always(data: bytes, *, close: bool = False) -> Callable[[Received], Answer]:
    return lambda _r: Answer(data, close=close)


# --- response framing -------------------------------------------------------------


async def test_content_length_body_is_read_exactly_and_the_connection_kept() -> None:
    async with peer(always(response(200, b"hello", [("X-A", "1")]))) as up:
        pool = make_pool()
        first = await fetch(pool, f"{up.url}/a")
        second = await fetch(pool, f"{up.url}/b")
        await pool.close()
    assert first[0] == 200 and first[2] == b"hello" and first[1]["X-A"] == "1"
    assert second[2] == b"hello"
    assert up.connections == 1
    assert [(r.connection, r.index, r.target) for r in up.received] == [(0, 0, "/a"), (0, 1, "/b")]


async def test_chunked_body_is_decoded_and_the_connection_kept() -> None:
    async with peer(always(chunked(200, [b"ab", b"c" * 70000, b"d"]))) as up:
        pool = make_pool()
        status, headers, body = await fetch(pool, f"{up.url}/")
        again = await fetch(pool, f"{up.url}/")
        await pool.close()
    assert status == 200 and body == b"ab" + b"c" * 70000 + b"d"
    assert headers["Transfer-Encoding"] == "chunked"
    assert again[2] == body
    assert up.connections == 1


async def test_close_delimited_body_ends_at_the_close_and_is_not_reused() -> None:
    answer = response(200, b"until the end", length=False)
    async with peer(always(answer, close=True)) as up:
        pool = make_pool()
        first = await fetch(pool, f"{up.url}/")
        second = await fetch(pool, f"{up.url}/")
        await pool.close()
    assert first[2] == second[2] == b"until the end"
    assert up.connections == 2


async def test_head_response_has_no_body_even_with_content_length() -> None:
    def respond(r: Received) -> Answer:
        if r.method == "HEAD":
            return Answer(response(200, headers=[("Content-Length", "1000")]))
        return Answer(response(200, b"get body"))

    async with peer(respond) as up:
        pool = make_pool()
        head = await asyncio.wait_for(fetch(pool, f"{up.url}/", "HEAD"), 2)
        get = await fetch(pool, f"{up.url}/")
        chunked_head = await fetch(pool, f"{up.url}/", "HEAD")
        await pool.close()
    assert head == (200, CIMultiDict({"Content-Length": "1000"}), b"")
    assert chunked_head[2] == b""
    assert get[2] == b"get body"  # the parser was reset after the HEAD
    assert up.connections == 1


async def test_interim_responses_are_skipped() -> None:
    answer = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        + response(201, b"made", [("X-Final", "yes")])
    )
    async with peer(always(answer)) as up:
        pool = make_pool()
        status, headers, body = await fetch(pool, f"{up.url}/", "POST", body=b"x")
        again = await fetch(pool, f"{up.url}/", "POST", body=b"y")
        await pool.close()
    assert (status, body) == (201, b"made")
    assert "Link" not in headers and headers["X-Final"] == "yes"
    assert again[0] == 201
    assert up.connections == 1


async def test_101_switching_protocols_is_a_protocol_error() -> None:
    answer = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
    )
    async with peer(always(answer)) as up:
        pool = make_pool()
        with pytest.raises(UpstreamProtocolError, match="switched protocols"):
            await fetch(pool, f"{up.url}/")
        await pool.close()


async def test_204_and_304_have_no_body() -> None:
    def respond(r: Received) -> Answer:
        if r.target == "/204":
            return Answer(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")
        # A 304 may announce the length of the body it does not carry.
        return Answer(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n")

    async with peer(respond) as up:
        pool = make_pool()
        no_content = await asyncio.wait_for(fetch(pool, f"{up.url}/204"), 2)
        not_modified = await asyncio.wait_for(fetch(pool, f"{up.url}/304"), 2)
        after = await asyncio.wait_for(fetch(pool, f"{up.url}/204"), 2)
        await pool.close()
    assert (no_content[0], no_content[2]) == (204, b"")
    assert (not_modified[0], not_modified[2]) == (304, b"")
    assert after[0] == 204
    assert up.connections == 1


async def test_connection_close_from_the_upstream_is_honoured() -> None:
    # The peer keeps the socket open: only the header says close, and that is enough.
    async with peer(always(response(200, b"x", [("Connection", "close")]))) as up:
        pool = make_pool()
        await fetch(pool, f"{up.url}/")
        await fetch(pool, f"{up.url}/")
        assert pool.idle_connections == 0
        await pool.close()
    assert up.connections == 2


async def test_http_1_0_response_without_keep_alive_is_not_reused() -> None:
    answer = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
    async with peer(always(answer)) as up:
        pool = make_pool()
        await fetch(pool, f"{up.url}/")
        await fetch(pool, f"{up.url}/")
        await pool.close()
    assert up.connections == 2


async def test_requests_are_never_pipelined() -> None:
    async with peer(lambda _r: Answer(response(200, b"slow"), delay_s=0.05)) as up:
        pool = make_pool()
        results = await asyncio.gather(*(fetch(pool, f"{up.url}/{i}") for i in range(8)))
        await asyncio.gather(*(fetch(pool, f"{up.url}/{i}") for i in range(8)))
        await pool.close()
    assert all(body == b"slow" for _, _, body in results)
    assert len(up.received) == 16
    assert not any(r.pipelined for r in up.received)
    assert up.connections == 8  # the second wave reused the first wave's connections


async def test_a_response_that_is_not_read_to_the_end_closes_the_connection() -> None:
    async with peer(always(response(200, b"z" * 500_000))) as up:
        pool = make_pool()
        resp = await pool.request(
            "GET",
            URL(f"{up.url}/"),
            CIMultiDict({"Host": "x"}),
            None,
            content_length=None,
            ssl=None,
            guarded=False,
        )
        await resp.readany()
        resp.release()
        await fetch(pool, f"{up.url}/")
        await pool.close()
    assert up.connections == 2


async def test_bytes_after_the_response_mean_the_connection_is_not_reused() -> None:
    answer = response(200, b"ok") + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    async with peer(always(answer)) as up:
        pool = make_pool()
        first = await fetch(pool, f"{up.url}/")
        await fetch(pool, f"{up.url}/")
        await pool.close()
    assert first[2] == b"ok"
    assert up.connections == 2


# --- idle connections and retries ---------------------------------------------------


async def test_an_idle_connection_the_upstream_closed_is_not_used() -> None:
    async with peer(always(response(200, b"ok"), close=True)) as up:
        pool = make_pool()
        await fetch(pool, f"{up.url}/")
        await asyncio.sleep(0.1)  # the FIN arrives while the connection is idle
        assert pool.idle_connections == 0
        assert (await fetch(pool, f"{up.url}/"))[2] == b"ok"
        await pool.close()
    assert up.connections == 2
    assert len(up.received) == 2  # nothing was sent twice


def drop_second_on_each_connection(r: Received) -> Answer:
    """Answer the first request of a connection; close without answering the others
    (the race of an upstream closing an idle connection just as a request goes out)."""
    if r.index == 0:
        return Answer(response(200, b"first"))
    return Answer(b"", close=True)


async def test_get_on_a_reused_connection_that_dies_is_retried_once() -> None:
    async with peer(drop_second_on_each_connection) as up:
        pool = make_pool()
        await fetch(pool, f"{up.url}/warm")
        status, _, body = await fetch(pool, f"{up.url}/again")
        await pool.close()
    assert (status, body) == (200, b"first")  # answered on a fresh connection
    assert [(r.target, r.connection, r.index) for r in up.received] == [
        ("/warm", 0, 0),
        ("/again", 0, 1),
        ("/again", 1, 0),
    ]


@pytest.mark.parametrize(
    ("method", "headers", "body"),
    [
        ("POST", {}, b"pay once"),
        ("PUT", {}, b"pay once"),  # idempotent by RFC 9110, not replayed by Go's rule
        ("GET", {}, "stream"),  # a streamed body cannot be sent again
    ],
)
async def test_a_request_that_cannot_be_replayed_is_not_retried(
    method: str, headers: dict[str, str], body: bytes | str
) -> None:
    async with peer(drop_second_on_each_connection) as up:
        pool = make_pool()
        await fetch(pool, f"{up.url}/warm")
        payload: RequestBody = body if isinstance(body, bytes) else stream([b"a", b"b"])
        with pytest.raises(UpstreamProtocolError, match="before answering"):
            await fetch(
                pool,
                f"{up.url}/once",
                method,
                headers=headers,
                body=payload,
                length=2 if body == "stream" else None,
            )
        await pool.close()
    assert [r.target for r in up.received] == ["/warm", "/once"]


async def test_post_with_an_idempotency_key_is_retried() -> None:
    async with peer(drop_second_on_each_connection) as up:
        pool = make_pool()
        await fetch(pool, f"{up.url}/warm")
        status, _, _ = await fetch(
            pool, f"{up.url}/pay", "POST", headers={"Idempotency-Key": "k1"}, body=b"x"
        )
        await pool.close()
    assert status == 200
    assert [r.target for r in up.received] == ["/warm", "/pay", "/pay"]


async def test_a_retry_that_fails_again_is_not_retried_again() -> None:
    async with peer(drop_second_on_each_connection) as up:
        pool = make_pool()
        # Two idle connections, each about to drop its next request.
        await asyncio.gather(fetch(pool, f"{up.url}/w1"), fetch(pool, f"{up.url}/w2"))
        assert pool.idle_connections == 2
        with pytest.raises(UpstreamProtocolError, match="before answering"):
            await fetch(pool, f"{up.url}/x")
        await pool.close()
    assert [r.target for r in up.received].count("/x") == 2


async def test_a_fresh_connection_that_closes_unanswered_is_not_retried() -> None:
    async with peer(lambda _r: Answer(b"", close=True)) as up:
        pool = make_pool()
        with pytest.raises(UpstreamProtocolError, match="before answering"):
            await fetch(pool, f"{up.url}/")
        await pool.close()
    assert len(up.received) == 1


# --- request bodies -----------------------------------------------------------------


async def test_request_bodies_are_framed_by_length_or_chunked() -> None:
    async with peer(always(response(200, b"ok"))) as up:
        pool = make_pool()
        big = bytes(range(256)) * 1000
        await fetch(pool, f"{up.url}/bytes", "POST", body=big)
        await fetch(pool, f"{up.url}/known", "PUT", body=stream([b"ab", b"", b"cd"]), length=4)
        await fetch(pool, f"{up.url}/unknown", "POST", body=stream([b"x" * 100_000, b"yz"]))
        await fetch(pool, f"{up.url}/empty", "POST")
        await fetch(pool, f"{up.url}/get")
        await pool.close()
    by_target = {r.target: r for r in up.received}
    assert by_target["/bytes"].body == big
    assert by_target["/bytes"].header(b"content-length") == [str(len(big)).encode()]
    assert by_target["/known"].body == b"abcd"
    assert by_target["/known"].header(b"content-length") == [b"4"]
    assert by_target["/known"].header(b"transfer-encoding") == []
    assert by_target["/unknown"].body == b"x" * 100_000 + b"yz"
    assert by_target["/unknown"].header(b"transfer-encoding") == [b"chunked"]
    assert by_target["/empty"].header(b"content-length") == [b"0"]
    assert by_target["/get"].header(b"content-length") == []
    assert up.connections == 1


async def test_an_aiohttp_stream_reader_body_is_sent_whole() -> None:
    loop = asyncio.get_running_loop()
    reader = aiohttp.StreamReader(BaseProtocol(loop), 2**16, loop=loop)
    reader.feed_data(b"from a client ")
    reader.feed_data(b"connection")
    reader.feed_eof()
    async with peer(always(response(200))) as up:
        pool = make_pool()
        await fetch(pool, f"{up.url}/", "POST", body=reader, length=24)
        await pool.close()
    assert up.received[0].body == b"from a client connection"


@pytest.mark.parametrize(
    ("chunks", "detail"), [([b"abc"], "ended before"), ([b"abcdef"], "longer")]
)
async def test_a_stream_that_breaks_its_content_length_fails_and_is_not_reused(
    chunks: list[bytes], detail: str
) -> None:
    async with peer(lambda _r: Answer(response(200), delay_s=0.2)) as up:
        pool = make_pool()
        with pytest.raises(BadRequestError, match=detail):
            await fetch(pool, f"{up.url}/", "POST", body=stream(chunks), length=5)
        assert pool.open_connections == 0 or pool.idle_connections == 0
        await pool.close()


async def test_a_body_error_of_our_own_reaches_the_caller() -> None:
    async def too_large() -> AsyncIterator[bytes]:
        yield b"some"
        raise PayloadTooLargeError("over the limit")

    async with peer(lambda _r: Answer(response(200), delay_s=5)) as up:
        pool = make_pool()
        with pytest.raises(PayloadTooLargeError):
            await fetch(pool, f"{up.url}/", "POST", body=too_large())
        await pool.close()


async def test_a_header_with_a_line_break_is_refused_before_sending() -> None:
    async with peer(always(response(200))) as up:
        pool = make_pool()
        with pytest.raises(BadRequestError, match="CR or LF"):
            await fetch(pool, f"{up.url}/", headers={"X-Bad": "a\r\nInjected: yes"})
        await pool.close()
    assert up.received == []


async def test_received_all_and_at_eof_say_where_the_body_stands() -> None:
    async def respond(r: Received) -> Answer:
        if r.target == "/small":
            return Answer(response(200, b"all of it"))
        return Answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")

    async with peer(respond) as up:
        pool = make_pool(read_timeout_s=0.3)
        small = await pool.request(
            "GET",
            URL(f"{up.url}/small"),
            CIMultiDict(Host="x"),
            None,
            content_length=None,
            ssl=None,
            guarded=False,
        )
        assert small.received_all()  # all here before any read
        assert not small.at_eof()
        assert await small.readany() == b"all of it"
        assert small.at_eof()
        small.release()
        assert pool.idle_connections == 1  # read whole: reusable without another readany
        partial = await pool.request(
            "GET",
            URL(f"{up.url}/open"),
            CIMultiDict(Host="x"),
            None,
            content_length=None,
            ssl=None,
            guarded=False,
        )
        assert await partial.readany() == b"abc"
        assert not partial.at_eof()  # the last chunk has not come
        assert not partial.received_all()
        partial.close()
        await pool.close()
