"""Oversized and slow inputs: refused without crashing, with the right status, and not
allowed to hold a connection open forever.

The slow tests give the proxy ``SLOW_BOUND_S`` to end a connection whose request head
(or body) trickles in or stalls: ``proxy.header_timeout_s`` (10 s by default) bounds a
request head, ``tls_handshake_timeout_s`` (10 s) a CONNECT head, ``body_timeout_s`` (60 s)
the wait for the next bytes of a body.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from tests.security.rig import API, Rig, running_rig


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    """The front door alone decides here: one rig, with the default upstream client."""
    async with running_rig() as running:
        yield running


BIG = 100_000
SLOW_BOUND_S = 12.0
"""The proxy must end a stalled or trickling request within this long (10 s + slack)."""

OVERSIZED = {
    "100 KB header": (
        f"GET http://{API}/p HTTP/1.1\r\nHost: {API}\r\nX-Big: {'a' * BIG}\r\n\r\n".encode(),
        431,
    ),
    "1000 headers": (
        (
            f"GET http://{API}/p HTTP/1.1\r\nHost: {API}\r\n"
            + "".join(f"X-H{i}: v\r\n" for i in range(1000))
            + "\r\n"
        ).encode(),
        431,
    ),
    "100 KB URI": (
        f"GET http://{API}/{'a' * BIG} HTTP/1.1\r\nHost: {API}\r\n\r\n".encode(),
        414,
    ),
    "100 KB header name": (
        f"GET http://{API}/p HTTP/1.1\r\nHost: {API}\r\nX-{'a' * BIG}: v\r\n\r\n".encode(),
        431,
    ),
}


@pytest.mark.parametrize(("data", "status"), [pytest.param(*v, id=k) for k, v in OVERSIZED.items()])
async def test_oversized_input_gets_431_or_414_and_the_proxy_survives(
    rig: Rig, data: bytes, status: int
) -> None:
    await rig.refused(data, status, closes=True, not_echoed=b"a" * 100)


Ending = tuple[str, float, bytes]
"""How the proxy ended a connection ('closed', 'answered', 'reset', 'still open', ...),
after how many seconds, and what it answered."""


async def _trickle(port: int, data: bytes, interval_s: float, limit_s: float) -> Ending:
    """Send ``data`` one byte every ``interval_s``; how did the proxy end it, and when?"""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        for index in range(len(data)):
            try:
                writer.write(data[index : index + 1])
                await writer.drain()
                answer = await asyncio.wait_for(reader.read(4096), interval_s)
            except TimeoutError:
                if time.monotonic() - started > limit_s:
                    return "still open", time.monotonic() - started, b""
                continue
            except ConnectionError:
                return "reset", time.monotonic() - started, b""
            return ("answered" if answer else "closed"), time.monotonic() - started, answer
        return "request complete", time.monotonic() - started, b""
    finally:
        writer.close()


async def test_request_head_trickled_byte_by_byte_is_cut_off(rig: Rig) -> None:
    """With the default proxy.header_timeout_s (10 s): 408 or close, nothing forwarded."""
    head = f"GET http://{API}/p HTTP/1.1\r\nHost: {API}\r\nX-Slow: {'a' * 200}\r\n\r\n"
    outcome, elapsed, answer = await _trickle(rig.port, head.encode(), 0.5, SLOW_BOUND_S)
    assert outcome in ("closed", "answered", "reset"), f"{outcome} after {elapsed:.1f} s"
    assert elapsed <= SLOW_BOUND_S
    assert outcome != "answered" or answer.startswith(b"HTTP/1.1 408 "), answer
    assert rig.requests == []
    await rig.assert_still_serves()


async def _stall(port: int, data: bytes, limit_s: float) -> Ending:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        writer.write(data)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(4096), limit_s)
        return ("answered" if answer else "closed"), time.monotonic() - started, answer
    except TimeoutError:
        return "still open", time.monotonic() - started, b""
    except ConnectionError:
        return "reset", time.monotonic() - started, b""
    finally:
        writer.close()


async def test_request_head_that_stalls_is_cut_off_after_header_timeout() -> None:
    async with running_rig(proxy_extra="  header_timeout_s: 1") as rig:
        outcome, elapsed, answer = await _stall(
            rig.port, f"GET http://{API}/p HTTP/1.1\r\nHost: {API}\r\nX-Half".encode(), 5
        )
        assert outcome in ("answered", "closed"), f"{outcome} after {elapsed:.1f} s"
        assert outcome != "answered" or answer.startswith(b"HTTP/1.1 408 "), answer
        assert 0.5 < elapsed < 3, elapsed
        assert rig.requests == []
        rig.assert_no_leak()


async def test_idle_keep_alive_connection_is_closed_after_client_idle_timeout() -> None:
    async with running_rig(proxy_extra="  client_idle_timeout_s: 1") as rig:
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
        try:
            writer.write(f"GET http://{API}/p HTTP/1.1\r\nHost: {API}\r\n\r\n".encode())
            await writer.drain()
            started = time.monotonic()
            data = b""
            while chunk := await asyncio.wait_for(reader.read(65536), 5):
                data += chunk
            elapsed = time.monotonic() - started
        finally:
            writer.close()
        assert data.startswith(b"HTTP/1.1 200 ")
        assert 0.5 < elapsed < 3, elapsed


@pytest.mark.parametrize(
    ("length", "sent"),
    [
        pytest.param(10, b"abc", id="buffered"),
        pytest.param(5_000_000, b"x" * 100_000, id="streamed"),  # over replay_body_limit_bytes
    ],
)
async def test_request_body_that_stalls_gets_408_after_body_timeout(
    length: int, sent: bytes
) -> None:
    async with running_rig(proxy_extra="  body_timeout_s: 1") as rig:
        head = f"POST http://{API}/p HTTP/1.1\r\nHost: {API}\r\nContent-Length: {length}\r\n\r\n"
        outcome, elapsed, answer = await _stall(rig.port, head.encode() + sent, 5)
        assert outcome == "answered", f"{outcome} after {elapsed:.1f} s"
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"body_timeout" in answer
        assert 0.5 < elapsed < 3, elapsed
        assert all(not r.complete for r in rig.requests)
        rig.assert_no_leak()
        await rig.assert_still_serves()


async def test_a_slow_but_steady_body_is_not_cut_off() -> None:
    """The timeout is between two reads, not for the whole body: 2.5 s of body that
    trickles in every 0.5 s passes a 1 s body_timeout_s."""
    async with running_rig(proxy_extra="  body_timeout_s: 1") as rig:
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
        try:
            writer.write(
                f"POST http://{API}/p HTTP/1.1\r\nHost: {API}\r\nContent-Length: 5\r\n\r\n".encode()
            )
            for byte in b"slow!":
                await asyncio.sleep(0.5)
                writer.write(bytes([byte]))
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert [bytes(r.body) for r in rig.requests] == [b"slow!"]


async def test_connections_stalled_on_a_connect_prefix_do_not_burn_cpu(rig: Rig) -> None:
    clients = [await asyncio.open_connection("127.0.0.1", rig.port) for _ in range(400)]
    try:
        for _reader, writer in clients:
            writer.write(b"CON")
        await asyncio.sleep(0.3)
        cpu, wall = time.process_time(), time.monotonic()
        await asyncio.sleep(2)
        share = (time.process_time() - cpu) / (time.monotonic() - wall)
    finally:
        for _reader, writer in clients:
            writer.close()
    assert share < 0.2, f"{share:.0%} of a core for 400 connections that sent 'CON'"


async def test_eof_after_a_connect_prefix_closes_the_connection_at_once(rig: Rig) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.port)
    try:
        writer.write(b"CON")
        writer.write_eof()
        started = time.monotonic()
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(reader.read(), 3)
        assert time.monotonic() - started < 1
    except TimeoutError:
        raise AssertionError("still open 3 s after the client's EOF") from None
    finally:
        writer.close()
