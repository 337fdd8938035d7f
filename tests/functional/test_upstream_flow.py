"""The lean upstream client: limits, truncation, timeouts, backpressure, TLS, egress,
idle expiry and shutdown, against real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gc
import socket
import ssl
import time
from collections.abc import AsyncIterator

import pytest
import trustme
from multidict import CIMultiDict
from yarl import URL

from m2m_proxy.config import parse_config
from m2m_proxy.egress import EgressPolicy
from m2m_proxy.errors import (
    DestinationDeniedError,
    LoopDetectedError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
    UpstreamTlsError,
    UpstreamUnreachableError,
)
from m2m_proxy.upstream import UpstreamPool
from m2m_proxy.upstream.connection import HIGH_WATER
from m2m_proxy.upstream.response import UpstreamResponse
from tests.functional.test_upstream_pool import always, fetch, make_pool
from tests.functional.upstream_peer import Answer, Received, peer, response


async def start(pool: UpstreamPool, url: str, **kwargs: object) -> UpstreamResponse:
    headers: CIMultiDict[str] = CIMultiDict({"Host": URL(url).authority})
    return await pool.request(
        str(kwargs.get("method", "GET")),
        URL(url),
        headers,
        None,
        content_length=None,
        ssl=kwargs.get("ssl"),  # type: ignore[arg-type]
        guarded=bool(kwargs.get("guarded", False)),
    )


# --- response head limits and truncated bodies ----------------------------------------


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ([("X-Big", "v" * 8191)], "over 8190 bytes"),
        ([(f"X-{i}", "v") for i in range(129)], "more than 128"),
        ([(f"X-{i}", "v" * 1000) for i in range(70)], "head is over 65536"),
        ([("X-Nul", "a\x00b")], "invalid response"),  # llhttp refuses control characters
    ],
)
async def test_response_heads_over_the_limits_are_refused(
    headers: list[tuple[str, str]], detail: str
) -> None:
    async with peer(always(response(200, b"x", headers))) as up:
        pool = make_pool()
        with pytest.raises(UpstreamProtocolError, match=detail):
            await fetch(pool, f"{up.url}/")
        await pool.close()


async def test_response_heads_at_the_limits_are_accepted() -> None:
    # 128 fields with the Content-Length response() adds, as aiohttp allows.
    headers = [("X-Big", "v" * 8190), *((f"X-{i}", "v") for i in range(126))]
    async with peer(always(response(200, b"x", headers))) as up:
        pool = make_pool()
        status, got, _ = await fetch(pool, f"{up.url}/")
        await pool.close()
    assert status == 200 and len(got["X-Big"]) == 8190


async def test_header_values_lose_trailing_whitespace_and_keep_order_and_duplicates() -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1  \r\nx-lower: y\r\n"
        b"SET-COOKIE: b=2\t\r\nContent-Length: 0\r\n\r\n"
    )
    async with peer(always(raw)) as up:
        pool = make_pool()
        _, headers, _ = await fetch(pool, f"{up.url}/")
        await pool.close()
    assert list(headers.items()) == [
        ("Set-Cookie", "a=1"),
        ("x-lower", "y"),
        ("SET-COOKIE", "b=2"),
        ("Content-Length", "0"),
    ]


@pytest.mark.parametrize(
    "answer",
    [
        response(200, headers=[("Content-Length", "1000")]) + b"x" * 10,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\nxxxxx",
    ],
    ids=["content-length", "chunked"],
)
async def test_a_body_cut_short_raises_after_what_arrived(answer: bytes) -> None:
    async with peer(always(answer, close=True)) as up:
        pool = make_pool()
        resp = await start(pool, f"{up.url}/")
        got = await resp.readany()
        with pytest.raises(UpstreamProtocolError, match="before the response body was complete"):
            while await resp.readany():
                pass
        resp.release()
        assert pool.idle_connections == 0
        await pool.close()
    assert got.startswith(b"x")


async def test_a_close_in_the_middle_of_the_head_is_a_protocol_error() -> None:
    async with peer(always(b"HTTP/1.1 200 OK\r\nContent-Le", close=True)) as up:
        pool = make_pool()
        with pytest.raises(UpstreamProtocolError, match="middle of the response head"):
            await fetch(pool, f"{up.url}/")
        await pool.close()


async def test_garbage_instead_of_a_response_is_a_protocol_error() -> None:
    async with peer(always(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")) as up:
        pool = make_pool()
        with pytest.raises(UpstreamProtocolError, match="invalid response"):
            await fetch(pool, f"{up.url}/")
        await pool.close()


# --- timeouts ---------------------------------------------------------------------------


async def test_an_upstream_that_does_not_answer_times_out() -> None:
    async with peer(lambda _r: Answer(response(200), delay_s=3)) as up:
        pool = make_pool(read_timeout_s=0.2)
        started = time.monotonic()
        with pytest.raises(UpstreamTimeoutError):
            await fetch(pool, f"{up.url}/")
        assert time.monotonic() - started < 1.5
        await pool.close()


async def test_a_body_that_stalls_times_out_after_what_arrived() -> None:
    async def respond(_r: Received) -> Answer:
        return Answer(response(200, headers=[("Content-Length", "100")]) + b"y" * 10)

    async with peer(respond) as up:
        pool = make_pool(read_timeout_s=0.2)
        resp = await start(pool, f"{up.url}/")
        assert await resp.readany() == b"y" * 10
        with pytest.raises(UpstreamTimeoutError):
            await resp.readany()
        resp.release()
        await pool.close()


async def test_a_slow_consumer_is_not_an_upstream_timeout() -> None:
    async with peer(always(response(200, b"all here"))) as up:
        pool = make_pool(read_timeout_s=0.2)
        resp = await start(pool, f"{up.url}/")
        await asyncio.sleep(0.5)  # the upstream is done; only we are slow
        assert await resp.readany() == b"all here"
        assert await resp.readany() == b""
        await pool.close()


async def test_a_tls_handshake_that_never_completes_hits_the_connect_timeout() -> None:
    with socket.socket() as listener:  # accepts (backlog), never speaks TLS
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        pool = make_pool(connect_timeout_s=0.3)
        started = time.monotonic()
        with pytest.raises(UpstreamTimeoutError):
            await fetch(pool, f"https://127.0.0.1:{port}/")
        assert time.monotonic() - started < 2
        await pool.close()


async def test_a_closed_port_is_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pool = make_pool()
    with pytest.raises(UpstreamUnreachableError, match="cannot connect"):
        await fetch(pool, f"http://127.0.0.1:{port}/")
    await pool.close()


# --- backpressure -------------------------------------------------------------------------


async def test_a_large_response_is_held_back_while_the_consumer_is_slow() -> None:
    size = 32 * 1024 * 1024
    body = b"b" * size
    async with peer(always(response(200, body))) as up:
        pool = make_pool()
        resp = await start(pool, f"{up.url}/")
        largest = 0
        received = 0
        stuck_upstream = 0
        while chunk := await resp.readany():
            largest = max(largest, len(chunk))
            received += len(chunk)
            if received < size // 2:
                # While we dawdle, the rest waits in the upstream's own send buffer.
                stuck_upstream = max(
                    stuck_upstream, up.writers[0].transport.get_write_buffer_size()
                )
                await asyncio.sleep(0.001)
        await pool.close()
    assert received == size
    # Never more than the pause threshold plus one read (uvloop reads up to 256 KiB).
    assert largest <= HIGH_WATER + 256 * 1024
    assert stuck_upstream > 8 * 1024 * 1024


async def test_a_large_upload_waits_for_a_slow_upstream() -> None:
    total = 48 * 1024 * 1024
    piece = 64 * 1024
    consumed = 0
    ahead = 0
    done = asyncio.Event()

    async def slow_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal consumed
        await reader.readuntil(b"\r\n\r\n")
        while consumed < total:
            data = await reader.read(piece)
            if not data:
                break
            consumed += len(data)
            await asyncio.sleep(0.0005)
        writer.write(response(200, b"got it"))
        await writer.drain()
        done.set()
        writer.close()

    async def produce() -> AsyncIterator[bytes]:
        nonlocal ahead
        sent = 0
        while sent < total:
            ahead = max(ahead, sent - consumed)
            yield b"u" * piece
            sent += piece

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    listener.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(slow_upstream, sock=listener)
    port = listener.getsockname()[1]
    pool = make_pool()
    status, _, body = await fetch(
        pool, f"http://127.0.0.1:{port}/", "POST", body=produce(), length=total
    )
    await done.wait()
    server.close()
    await server.wait_closed()
    await pool.close()
    assert (status, body, consumed) == (200, b"got it", total)
    # Without backpressure the generator would be the whole body ahead at once.
    assert ahead < 12 * 1024 * 1024, ahead


# --- TLS ----------------------------------------------------------------------------------


def tls_pair(ca: trustme.CA, *names: str) -> tuple[ssl.SSLContext, list[str | None]]:
    """A server context for ``names`` that records the SNI each handshake carried."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*names).configure_cert(server)
    seen: list[str | None] = []

    def sni(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        seen.append(name)

    server.sni_callback = sni
    return server, seen


def client_trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def test_tls_sends_sni_and_verifies_the_host_name() -> None:
    ca = trustme.CA()
    server, seen = tls_pair(ca, "localhost")
    async with peer(always(response(200, b"secure")), tls=server) as up:
        pool = make_pool()
        url = f"https://localhost:{up.port}/"
        resp = await start(pool, url, ssl=client_trusting(ca))
        assert await resp.readany() == b"secure"
        assert await resp.readany() == b""
        again = await start(pool, url, ssl=client_trusting(ca))  # another context: own pool
        await again.readany()
        again.release()
        await pool.close()
    assert seen == ["localhost", "localhost"]
    assert up.connections == 2


async def test_tls_to_an_ip_address_verifies_the_ip() -> None:
    ca = trustme.CA()
    server, _ = tls_pair(ca, "127.0.0.1")
    context = client_trusting(ca)
    async with peer(always(response(200, b"ip")), tls=server) as up:
        pool = make_pool()
        for _ in range(2):
            resp = await start(pool, f"https://127.0.0.1:{up.port}/", ssl=context)
            assert await resp.readany() == b"ip"
            assert await resp.readany() == b""
        await pool.close()
    assert up.connections == 1  # the same context: the same pool


@pytest.mark.parametrize(
    ("names", "trusted", "detail"),
    [
        (("other.test",), True, "failed verification"),  # wrong host name
        (("localhost",), False, "failed verification"),  # unknown CA
    ],
)
async def test_tls_verification_failures(
    names: tuple[str, ...], trusted: bool, detail: str
) -> None:
    ca = trustme.CA()
    server, _ = tls_pair(ca, *names)
    async with peer(always(response(200)), tls=server) as up:
        pool = make_pool()
        context = client_trusting(ca) if trusted else None
        with pytest.raises(UpstreamTlsError, match=detail):
            await start(pool, f"https://localhost:{up.port}/", ssl=context)
        await pool.close()
    assert up.received == []


async def test_https_to_a_plain_http_upstream_fails_without_sending() -> None:
    async with peer(always(response(200))) as up:
        pool = make_pool()
        with pytest.raises(UpstreamError):
            await start(pool, f"https://127.0.0.1:{up.port}/")
        await pool.close()
    assert up.received == []


async def test_close_delimited_body_over_tls() -> None:
    ca = trustme.CA()
    server, _ = tls_pair(ca, "localhost")
    async with peer(
        always(response(200, b"to the end", length=False), close=True), tls=server
    ) as up:
        pool = make_pool()
        resp = await start(pool, f"https://localhost:{up.port}/", ssl=client_trusting(ca))
        data = b""
        while chunk := await resp.readany():
            data += chunk
        await pool.close()
    assert data == b"to the end"


# --- egress policy (guarded requests) --------------------------------------------------------


def egress(extra: str = "") -> EgressPolicy:
    text = f"""
proxy:
  listen: 127.0.0.1:0
  admin_listen: 127.0.0.1:0
{extra}
clients:
  c:
    token_url: https://idp.example.com/token
    client_id: x
    client_secret: y
routes: []
"""
    return EgressPolicy(parse_config(text, "test.yaml", {}).proxy)


async def test_guarded_requests_follow_the_egress_policy() -> None:
    async with peer(always(response(200, b"allowed"))) as up:
        strict = UpstreamPool(connect_timeout_s=2, read_timeout_s=2, egress=egress())
        with pytest.raises(DestinationDeniedError):
            await start(strict, f"http://localhost:{up.port}/", guarded=True)
        own = egress("  allow_destinations: [127.0.0.1/32]")
        own.set_own([("127.0.0.1", up.port)])
        looping = UpstreamPool(connect_timeout_s=2, read_timeout_s=2, egress=own)
        with pytest.raises(LoopDetectedError):
            await start(looping, f"http://localhost:{up.port}/", guarded=True)
        allowed = UpstreamPool(
            connect_timeout_s=2,
            read_timeout_s=2,
            egress=egress("  allow_destinations: [127.0.0.1/32]"),
        )
        resp = await start(allowed, f"http://localhost:{up.port}/", guarded=True)
        assert await resp.readany() == b"allowed"
        # The same destination unguarded (a route names it) is another pool.
        assert (await fetch(strict, f"http://localhost:{up.port}/"))[2] == b"allowed"
        for pool in (strict, looping, allowed):
            await pool.close()
    assert len(up.received) == 2


# --- idle expiry, shutdown ---------------------------------------------------------------------


async def test_idle_connections_expire() -> None:
    async with peer(always(response(200, b"ok"))) as up:
        pool = make_pool(keepalive_s=0.2)
        await fetch(pool, f"{up.url}/")
        assert pool.idle_connections == 1
        await asyncio.sleep(0.1)
        await fetch(pool, f"{up.url}/")  # reuse restarts the idle clock
        await asyncio.sleep(0.15)
        assert pool.idle_connections == 1
        for _ in range(50):
            if pool.open_connections == 0:
                break
            await asyncio.sleep(0.02)
        assert (pool.idle_connections, pool.open_connections) == (0, 0)
        for _ in range(50):
            if up.closed_by_client:
                break
            await asyncio.sleep(0.02)
        assert up.closed_by_client == 1
        await pool.close()
    assert up.connections == 1


async def test_close_ends_every_connection_and_task_cleanly() -> None:
    ca = trustme.CA()
    server, _ = tls_pair(ca, "localhost")
    context = client_trusting(ca)
    tasks_before = len(asyncio.all_tasks())

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"start"
        await asyncio.sleep(10)
        yield b"never"

    async with (
        peer(always(response(200, b"ok")), tls=server) as tls_up,
        peer(lambda _r: Answer(response(200), delay_s=10)) as plain_up,
    ):
        pool = make_pool()
        await start(pool, f"https://localhost:{tls_up.port}/", ssl=context)
        resp = await start(pool, f"https://localhost:{tls_up.port}/", ssl=context)
        assert await resp.readany() == b"ok"
        assert await resp.readany() == b""  # back in the pool, idle
        pending = asyncio.ensure_future(  # noqa: TID251 - awaited below
            fetch(pool, f"{plain_up.url}/", "POST", body=slow_body())
        )
        await asyncio.sleep(0.1)
        await pool.close()
        with pytest.raises(UpstreamError):
            await pending
        assert pool.open_connections == 0
        with pytest.raises(UpstreamUnreachableError, match="shutting down"):
            await fetch(pool, f"{plain_up.url}/")
    gc.collect()  # an unclosed transport would warn here (warnings are errors)
    assert len(asyncio.all_tasks()) == tasks_before


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",  # whitespace before the colon
        b"HTTP/1.1 200 OK\r\nX-A: a\x7fb\r\nContent-Length: 2\r\n\r\nok",  # DEL in a value
        b"HTTP/1.1 200 OK\r\nX-A: a\r\n folded\r\nContent-Length: 2\r\n\r\nok",  # obs-fold
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ],
    ids=["space-before-colon", "control-character", "obs-fold", "two-lengths", "length-and-te"],
)
async def test_malformed_response_fields_are_refused_not_relayed(head: bytes) -> None:
    async with peer(always(head)) as up:
        pool = make_pool()
        with pytest.raises(UpstreamProtocolError, match="invalid response"):
            await fetch(pool, f"{up.url}/")
        await asyncio.sleep(0.05)
        assert (pool.idle_connections, pool.open_connections) == (0, 0)  # closed, not kept
        await pool.close()


async def test_bare_lf_line_ends_are_accepted_as_aiohttp_does() -> None:
    async with peer(always(b"HTTP/1.1 200 OK\nX-A: 1\nContent-Length: 2\n\nok")) as up:
        pool = make_pool()
        status, headers, body = await fetch(pool, f"{up.url}/")
        await pool.close()
    assert (status, headers["X-A"], body) == (200, "1", b"ok")
