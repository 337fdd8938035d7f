"""Other protocols and versions on the proxy port (HTTP/2 preface, HTTP/0.9, HTTP/1.2,
HTTP/2.0 request lines) and CONNECT abuse."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from tests.security.capture import exchange
from tests.security.rig import API, Rig, running_rig


async def test_http2_connection_preface_is_refused(rig: Rig) -> None:
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    settings_frame = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    await rig.refused(preface + settings_frame, 400, closes=True)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(f"GET http://{API}/p HTTP/3\r\nHost: {API}\r\n\r\n".encode(), id="HTTP/3"),
        pytest.param(f"GET http://{API}/p HTTP/9.9\r\nHost: {API}\r\n\r\n".encode(), id="9.9"),
        pytest.param(f"GET http://{API}/p HTTP/10.0\r\nHost: {API}\r\n\r\n".encode(), id="10.0"),
        pytest.param(f"GET http://{API}/p HTTP/1.10\r\nHost: {API}\r\n\r\n".encode(), id="1.10"),
        pytest.param(f"GET http://{API}/p http/1.1\r\nHost: {API}\r\n\r\n".encode(), id="lower"),
        pytest.param(f"GET http://{API}/p HTTP/1.1 x\r\nHost: {API}\r\n\r\n".encode(), id="extra"),
        pytest.param(f"get http://{API}/p HTTP/1.1\r\nHost: {API}\r\n\r\n".encode(), id="get"),
        pytest.param(f"G\x01T http://{API}/p HTTP/1.1\r\nHost: {API}\r\n\r\n".encode(), id="ctl"),
    ],
)
async def test_unknown_versions_and_bad_request_lines_are_refused(rig: Rig, data: bytes) -> None:
    await rig.refused(data, (400, 505), closes=True)


async def test_http_1_2_is_refused_or_answered_as_http_1_1(rig: Rig) -> None:
    """RFC 9112 2.3: a higher minor version is processed as the highest one implemented."""
    reply = await rig.send(f"GET http://{API}/p HTTP/1.2\r\nHost: {API}\r\n\r\n".encode())
    assert reply.error is None
    assert reply.statuses in ([200], [400], [505])
    assert reply.versions[0] in (b"1.0", b"1.1")
    rig.assert_upstream_clean()
    await rig.assert_still_serves()


async def test_http_2_0_request_line_is_refused(rig: Rig) -> None:
    await rig.refused(
        f"GET http://{API}/p HTTP/2.0\r\nHost: {API}\r\n\r\n".encode(), (400, 505), closes=None
    )


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(f"GET http://{API}/p\r\n\r\n".encode(), id="no-version"),
        pytest.param(f"GET http://{API}/p HTTP/0.9\r\nHost: {API}\r\n\r\n".encode(), id="0.9"),
    ],
)
async def test_http_0_9_is_refused(rig: Rig, data: bytes) -> None:
    await rig.refused(data, (400, 505), closes=None)


async def test_http_0_9_origin_form_gets_nothing_upstream(rig: Rig) -> None:
    """Without Host there is no destination: refused, whatever the status line says."""
    reply = await rig.send(b"GET /p\r\n\r\n")
    assert reply.statuses == [400]
    assert rig.requests == []
    await rig.assert_still_serves()


@pytest.fixture
async def tunnel_rig() -> AsyncIterator[Rig]:
    async with running_rig(tunnel=True) as running:
        yield running


async def test_connect_to_an_unrouted_listener_is_refused_without_connecting(rig: Rig) -> None:
    authority = f"127.0.0.1:{rig.a.port}"  # a live listener that no route names
    data = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    await rig.refused(data, 403, closes=True, code="route_denied")


async def test_connect_to_a_routed_host_without_interception_ca_is_refused(rig: Rig) -> None:
    data = f"CONNECT {API}:443 HTTP/1.1\r\nHost: {API}:443\r\n\r\n".encode()
    await rig.refused(data, 403, closes=True, code="route_denied")


@pytest.mark.parametrize(
    "target",
    [
        f"http://{API}:443/",
        f"user@{API}:443",
        f"{API}",
        "/x",
        f"{API}:0",
        f"{API}:65536",
        f"{API}:443/path",
    ],
)
async def test_connect_with_a_target_other_than_host_port_is_refused(rig: Rig, target: str) -> None:
    data = f"CONNECT {target} HTTP/1.1\r\nHost: {API}:443\r\n\r\n".encode()
    await rig.refused(data, 400, closes=True, code="bad_request")


async def test_connect_with_http_2_version_is_refused(rig: Rig) -> None:
    await rig.refused(f"CONNECT {API}:443 HTTP/2.0\r\n\r\n".encode(), 400, closes=True)


async def test_lower_case_connect_is_refused(rig: Rig) -> None:
    await rig.refused(f"connect {API}:443 HTTP/1.1\r\n\r\n".encode(), 400, closes=True)


async def test_oversized_connect_head_is_refused(rig: Rig) -> None:
    data = f"CONNECT {API}:443 HTTP/1.1\r\nX-Big: {'a' * 10_000}\r\n\r\n".encode()
    await rig.refused(data, 400, closes=True)


async def test_connect_that_is_not_first_on_the_connection_is_refused(rig: Rig) -> None:
    """The bytes after the refused CONNECT are not tunnelled anywhere."""
    authority = f"127.0.0.1:{rig.a.port}"
    data = (
        f"GET http://{API}/first HTTP/1.1\r\nHost: {API}\r\n\r\n"
        f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    ).encode()
    reply = await rig.send(data)
    assert reply.error is None
    assert reply.statuses == [200, 501]
    assert [r.target for r in rig.a.requests] == [b"/first"]
    assert len(rig.a.connections) == 1  # the pooled connection of /first, nothing else
    rig.assert_upstream_clean()
    await rig.assert_still_serves()


async def test_blind_tunnel_relays_bytes_after_the_connect_head(tunnel_rig: Rig) -> None:
    """Control case: a routed https: tunnel host gets exactly what follows the head."""
    assert tunnel_rig.c is not None
    authority = f"127.0.0.1:{tunnel_rig.c.port}"
    inner = b"GET /inside HTTP/1.1\r\nHost: inner\r\n\r\n"
    data = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode() + inner
    reply = await exchange(tunnel_rig.port, data, timeout_s=1.5)  # a tunnel: no framing
    assert reply.raw.startswith(b"HTTP/1.1 200 Connection established\r\n\r\n")
    assert [r.target for r in tunnel_rig.c.requests] == [b"/inside"]
    assert tunnel_rig.c.requests[0].header("Authorization") == []  # blind: no token
    assert tunnel_rig.a.requests == []
    tunnel_rig.assert_no_leak(reply)


@pytest.mark.parametrize(
    ("framing", "body"),
    [("Content-Length: 5", b"hello"), ("Transfer-Encoding: chunked", b"0\r\n\r\n")],
)
async def test_connect_with_a_body_is_refused(tunnel_rig: Rig, framing: str, body: bytes) -> None:
    assert tunnel_rig.c is not None
    authority = f"127.0.0.1:{tunnel_rig.c.port}"
    data = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{framing}\r\n\r\n".encode()
    reply = await exchange(tunnel_rig.port, data + body, timeout_s=1.5)
    tunnel_rig.assert_no_leak(reply)
    assert reply.statuses == [400], reply.raw[:200]
    assert tunnel_rig.c.connections == []


async def test_connect_head_with_bare_lf_is_answered_promptly(rig: Rig) -> None:
    started = time.monotonic()
    reply = await rig.send(f"CONNECT {API}:443 HTTP/1.1\nHost: {API}:443\n\n".encode(), timeout_s=3)
    assert reply.statuses == [400], f"no answer after {time.monotonic() - started:.1f} s"


async def test_half_sent_connect_head_is_dropped_after_the_handshake_timeout() -> None:
    """Recorded behaviour: an unfinished CONNECT head is closed after
    tls_handshake_timeout_s (here 1 s), with no answer and no upstream connection."""
    async with running_rig(proxy_extra="  tls_handshake_timeout_s: 1") as rig:
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
        writer.write(f"CONNECT {API}:443 HTTP/1.1\r\n".encode())
        await writer.drain()
        started = time.monotonic()
        data = await asyncio.wait_for(reader.read(), 15)
        elapsed = time.monotonic() - started
        writer.close()
        assert data == b""
        assert 0.5 < elapsed < 3, elapsed
        assert rig.upstream_connections == 0
