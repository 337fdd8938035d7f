"""Load generator for the HTTPS-interception benchmark: HTTP/1.1 GETs through CONNECT + TLS.

wrk cannot send CONNECT, so this is a small asyncio client (uvloop when installed) that
keeps its own overhead low: the CONNECT exchange on the raw socket, TLS started on it with
``loop.create_connection(sock=..., ssl=...)`` (the proxy's CA trusted, the tunnel's host
verified), the requests as prebuilt bytes and the responses parsed by hand in a Protocol.
It runs in its own process (bench/https.py starts it), so it does not share the event loop,
or the core, of the proxy it loads.

Two modes, ``--connections`` workers each:

- ``keepalive``: each worker opens one tunnel (CONNECT, TLS handshake, not timed), then
  sends GET after GET on it for ``--duration`` seconds, one at a time, as wrk does;
  the figure is requests per second over all tunnels.
- ``handshake``: each worker repeats, for ``--duration`` seconds: new TCP connection,
  CONNECT, TLS handshake (full: no session resumption), one GET, close (close_notify, then
  the connection is closed); the figure is tunnels (handshakes) per second.

Every response must be a 200 (other statuses and socket errors are counted, and a broken
tunnel is opened again); the first response of each tunnel must also be the demo API's
echo for ``--client-id`` with exactly one Authorization header. The result is one line,
``TUNNEL_JSON {...}``, on stdout: counts, rate, latency percentiles (µs; of one request
in keepalive mode, of the whole connect-to-close cycle in handshake mode), errors by kind,
and the CPU this client used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import ssl
import sys
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

CONNECT_TIMEOUT_S = 10.0
SETUP_TIMEOUT_S = 30.0  # all keep-alive tunnels open
REQUEST_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 2.0
_MAX_HEAD = 16384


class LoadError(RuntimeError):
    """One tunnel failed; the message is the error kind counted."""


@dataclass(frozen=True, slots=True)
class Plan:
    """What to send, and where."""

    proxy: tuple[str, int]
    authority: str  # host:port of the CONNECT
    host: str  # the TLS server name and the Host header
    connect: bytes
    request: bytes
    context: ssl.SSLContext
    client_id: str


@dataclass(slots=True)
class Tally:
    """What the workers did inside the measurement window."""

    ops: int = 0
    tunnels: int = 0
    latencies_us: array[float] = field(default_factory=lambda: array("d"))
    errors: Counter[str] = field(default_factory=Counter)


class HttpClient(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection (inside TLS): one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes, bool]] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TLS transport implements asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        try:
            parsed = _parse_response(self._buffer)
        except LoadError as exc:
            waiter.set_exception(exc)
            return
        if parsed is not None:
            waiter.set_result(parsed)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(LoadError("closed_by_server"))
        if not self.closed.done():
            self.closed.set_result(None)

    async def get(self, request: bytes) -> tuple[int, bytes, bool]:
        """Send ``request``; status, body and whether the server will close."""
        if self.transport is None or self.transport.is_closing():
            raise LoadError("closed_by_server")
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            return await self._waiter

    async def close(self) -> None:
        """TLS close_notify, then wait (briefly) until the connection is closed."""
        if self.transport is not None:
            self.transport.close()
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self.closed
            except TimeoutError:
                self.transport.abort()


def _parse_response(buffer: bytearray) -> tuple[int, bytes, bool] | None:
    """One complete response taken off the front of ``buffer``, or None if incomplete."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > _MAX_HEAD:
            raise LoadError("bad_response")
        return None
    head = bytes(buffer[:end]).lower()
    try:
        status = int(head[9:12])
    except ValueError:
        raise LoadError("bad_response") from None
    start = end + 4
    at = head.find(b"\r\ncontent-length:")
    if at >= 0:
        stop = head.find(b"\r\n", at + 2)
        length = int(head[at + 17 : stop if stop >= 0 else len(head)])
        if len(buffer) < start + length:
            return None
        body = bytes(buffer[start : start + length])
        del buffer[: start + length]
    elif b"\r\ntransfer-encoding: chunked" in head:
        chunks = _dechunk(buffer, start)
        if chunks is None:
            return None
        body, consumed = chunks
        del buffer[:consumed]
    else:
        raise LoadError("bad_response")  # no length: the demo API always sends one
    return status, body, b"\r\nconnection: close" in head


def _dechunk(buffer: bytearray, at: int) -> tuple[bytes, int] | None:
    body = bytearray()
    while True:
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            return None
        size = int(bytes(buffer[at:line_end]).split(b";")[0], 16)
        data_at = line_end + 2
        if len(buffer) < data_at + size + 2:
            return None
        if size == 0:
            return bytes(body), data_at + 2
        body += buffer[data_at : data_at + size]
        at = data_at + size + 2


def _check_echo(body: bytes, client_id: str) -> bool:
    try:
        answer: Any = json.loads(body)
    except ValueError:
        return False
    return (
        isinstance(answer, dict)
        and answer.get("client_id") == client_id
        and answer.get("authorization_count") == 1
    )


async def open_tunnel(plan: Plan) -> HttpClient:
    """TCP to the proxy, CONNECT, TLS: a client for requests inside the tunnel."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            await loop.sock_connect(sock, plan.proxy)
            await loop.sock_sendall(sock, plan.connect)
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = await loop.sock_recv(sock, 4096)
                if not chunk:
                    raise LoadError("connect_closed")
                answer += chunk
                if len(answer) > _MAX_HEAD:
                    raise LoadError("connect_bad_answer")
        if answer[8:13] != b" 200 " or not answer.endswith(b"\r\n\r\n"):
            raise LoadError(f"connect_{answer[9:12].decode('ascii', 'replace')}")
        _, client = await loop.create_connection(
            HttpClient,
            sock=sock,
            ssl=plan.context,
            server_hostname=plan.host,
            ssl_handshake_timeout=CONNECT_TIMEOUT_S,
        )
    except BaseException:
        sock.close()
        raise
    return client


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, LoadError):
        return str(exc)
    if isinstance(exc, ssl.SSLError):
        return f"tls_{exc.reason or type(exc).__name__}"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return type(exc).__name__


class Run:
    """The workers of one run and their shared window and tally."""

    def __init__(self, plan: Plan, duration_s: float) -> None:
        self.plan = plan
        self.duration_s = duration_s
        self.tally = Tally()
        self.started = 0.0
        self.deadline = 0.0

    def _answer(self, status: int, body: bytes, first: bool) -> bool:
        """Count one response; False if it is not what the benchmark expects."""
        if status != 200:
            self.tally.errors[f"status_{status}"] += 1
            return False
        if first and not _check_echo(body, self.plan.client_id):
            self.tally.errors["unexpected_answer"] += 1
            return False
        return True

    async def keepalive_worker(self, client: HttpClient, ready: asyncio.Event) -> None:
        plan, tally = self.plan, self.tally
        first = True
        await ready.wait()
        while time.perf_counter() < self.deadline:
            sent = time.perf_counter()
            try:
                status, body, closing = await client.get(plan.request)
            except (OSError, LoadError, ssl.SSLError, TimeoutError) as exc:
                tally.errors[_error_kind(exc)] += 1
                closing = True
            else:
                done = time.perf_counter()
                if self._answer(status, body, first) and done <= self.deadline:
                    tally.ops += 1
                    tally.latencies_us.append((done - sent) * 1e6)
                first = False
            if closing:  # the tunnel is gone: count it, open another
                if client.transport is not None:
                    client.transport.abort()
                client = await self._reopen()
                first = True
        await client.close()

    async def _reopen(self) -> HttpClient:
        while True:
            try:
                client = await open_tunnel(self.plan)
            except (OSError, LoadError, ssl.SSLError, TimeoutError) as exc:
                self.tally.errors[_error_kind(exc)] += 1
                await asyncio.sleep(0.05)
                continue
            self.tally.tunnels += 1
            return client

    async def handshake_worker(self, ready: asyncio.Event) -> None:
        plan, tally = self.plan, self.tally
        await ready.wait()
        while time.perf_counter() < self.deadline:
            began = time.perf_counter()
            try:
                client = await open_tunnel(plan)
            except (OSError, LoadError, ssl.SSLError, TimeoutError) as exc:
                tally.errors[_error_kind(exc)] += 1
                await asyncio.sleep(0.05)
                continue
            try:
                status, body, _closing = await client.get(plan.request)
            except (OSError, LoadError, ssl.SSLError, TimeoutError) as exc:
                tally.errors[_error_kind(exc)] += 1
                if client.transport is not None:
                    client.transport.abort()
                continue
            await client.close()
            done = time.perf_counter()
            if self._answer(status, body, first=True) and done <= self.deadline:
                tally.ops += 1
                tally.tunnels += 1
                tally.latencies_us.append((done - began) * 1e6)


async def run(plan: Plan, mode: str, connections: int, duration_s: float) -> dict[str, Any]:
    """One load run; the result as a JSON-able dict."""
    the_run = Run(plan, duration_s)
    ready = asyncio.Event()
    if mode == "keepalive":
        async with asyncio.timeout(SETUP_TIMEOUT_S):
            clients = await asyncio.gather(*(open_tunnel(plan) for _ in range(connections)))
        workers = [the_run.keepalive_worker(c, ready) for c in clients]
    else:
        workers = [the_run.handshake_worker(ready) for _ in range(connections)]
    tasks = asyncio.gather(*workers)
    await asyncio.sleep(0)  # workers are waiting for the start
    cpu_before = _cpu_s()
    the_run.started = time.perf_counter()
    the_run.deadline = the_run.started + duration_s
    ready.set()
    await asyncio.sleep(duration_s)
    cpu_window = _cpu_s() - cpu_before
    wall = time.perf_counter() - the_run.started
    await tasks  # the last requests finish (uncounted past the deadline); tunnels close
    tally = the_run.tally
    latencies = sorted(tally.latencies_us)
    return {
        "mode": mode,
        "connections": connections,
        "ops": tally.ops,
        "tunnels_opened": tally.tunnels + (connections if mode == "keepalive" else 0),
        "duration_s": round(wall, 4),
        "ops_per_s": tally.ops / wall,
        "latency_us": {
            name: _percentile(latencies, q)
            for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
        },
        "errors": dict(tally.errors),
        "client_cpu_cores": cpu_window / wall,
    }


def _percentile(ordered: Sequence[float], q: float) -> float:
    if not ordered:
        return 0.0
    return round(ordered[min(int(q * len(ordered)), len(ordered) - 1)], 1)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make_plan(proxy: str, authority: str, cafile: str, path: str, client_id: str) -> Plan:
    proxy_host, _, proxy_port = proxy.rpartition(":")
    host, _, _port = authority.rpartition(":")
    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(["http/1.1"])
    connect = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode("ascii")
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode("ascii")
    return Plan(
        proxy=(proxy_host, int(proxy_port)),
        authority=authority,
        host=host,
        connect=connect,
        request=request,
        context=context,
        client_id=client_id,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GETs through CONNECT + TLS (benchmark load)")
    parser.add_argument("--proxy", required=True, help="the proxy, 127.0.0.1:PORT")
    parser.add_argument("--authority", required=True, help="CONNECT target, host:port")
    parser.add_argument("--cafile", required=True, help="CA that signs the proxy's leaves")
    parser.add_argument("--mode", choices=("keepalive", "handshake"), required=True)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--path", default="/hello")
    parser.add_argument("--client-id", default="demo-basic")
    args = parser.parse_args(argv)
    if ":" not in args.authority or args.connections < 1 or args.duration <= 0:
        parser.error("need --authority host:port, --connections >= 1, --duration > 0")
    plan = make_plan(args.proxy, args.authority, args.cafile, args.path, args.client_id)
    coroutine = run(plan, args.mode, args.connections, args.duration)
    try:
        import uvloop  # noqa: PLC0415 - optional: the same client runs on plain asyncio

        result = uvloop.run(coroutine)
    except ImportError:
        result = asyncio.run(coroutine)
    print("TUNNEL_JSON " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
