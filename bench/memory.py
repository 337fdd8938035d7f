"""Memory footprint of m2m-proxy: what streaming a large body and holding idle keep-alive
connections cost in resident memory of the proxy process.

    .venv/bin/python bench/memory.py                 # 1 GiB bodies, 10,000 idle connections
    .venv/bin/python bench/memory.py --size 256 --idle 2000 --loops uvloop

Every measure runs a fresh ``m2m-proxy run`` process (so its RSS is its own and no
measure inherits another's freed-but-kept memory), forward (absolute-form) requests to a
route whose token comes from the dev IdP (deploy/dev_stack.py), and an upstream in its
own process (``memory.py upstream``: raw asyncio, bodies generated on the fly, uploads
counted and CRC-checked, never stored). The clients are blocking sockets in this process.
The proxy's VmRSS is sampled from /proc every 50 ms and its VmHWM (peak RSS, reset through
/proc/PID/clear_refs before each measure) read at the end; "added" is the peak minus the
RSS just before the measure, after a warm-up that fetched the token and streamed a few
MiB both ways.

Measures: a download (client reads as fast as it can), an upload (client sends as fast as
it can), a slow reader (stalls, then reads at --slow-rate while the upstream could send
far faster: backpressure must hold the upstream back), an upload to a slow upstream, and
--idle keep-alive connections that each made one request and stay open ((RSS after -
RSS before) / count). Each with uvloop (m2m-proxy's default) and with asyncio's own loop
(the proxy started with uvloop made unimportable). Results: a table, and
bench/results/memory.json. tests/functional/test_memory_footprint.py asserts the same
bounds at CI sizes with these helpers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
# deploy/dev_stack.py, imported as `dev_stack` like the tests and bench/run.py do.
if str(ROOT / "deploy") not in sys.path:
    sys.path.insert(0, str(ROOT / "deploy"))

from dev_stack import DevStack, DevStackError, wait_proxy_ready  # noqa: E402

from rig import free_ports  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "memory.json"
KIB = 1024
MIB = 1024 * 1024
HOST = "mem.test"
PATTERN = bytes(range(256)) * 4096
"""1 MiB; every body is this repeated (then cut), so a CRC-32 checks it end to end."""
WARM_BYTES = 4 * MIB  # more than replay_body_limit_bytes (1 MiB): the streamed path
SAMPLE_S = 0.05
READY_TIMEOUT_S = 30.0
IO_TIMEOUT_S = 60.0
# Run the proxy's own CLI with uvloop unimportable: cli._loop_factory falls back to asyncio.
_NO_UVLOOP = (
    "import sys; sys.modules['uvloop'] = None; "
    "from m2m_proxy.cli import main; sys.exit(main(sys.argv[1:]))"
)

STREAM_TARGET_MIB = 50
IDLE_TARGET_KIB = 20


class MemoryBenchError(RuntimeError):
    """A measure could not be made; the message says why."""


# -- the upstream (its own process) --------------------------------------------------------


@lru_cache(maxsize=16)
def pattern_crc(size: int) -> int:
    """CRC-32 of the first ``size`` bytes of the repeated PATTERN."""
    crc, left, view = 0, size, memoryview(PATTERN)
    while left:
        take = min(left, len(PATTERN))
        crc = zlib.crc32(view[:take], crc)
        left -= take
    return crc


class _UpstreamProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive, just enough for the proxy: ``GET /bytes/N`` streams N bytes of
    PATTERN; ``POST /upload[?rate=BYTES_PER_S]`` reads a Content-Length body (at most at
    that rate: reading is paused between slices) and answers its length and CRC-32.
    Any request without ``Authorization: Bearer`` gets 401."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._head = bytearray()
        self._body_left = 0
        self._received = 0
        self._crc = 0
        self._rate = 0.0
        self._started = 0.0
        self._paused = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self._writable.set()
        for task in self._tasks:
            task.cancel()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def data_received(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._body_left:
                take = min(len(view), self._body_left)
                self._crc = zlib.crc32(view[:take], self._crc)
                self._received += take
                self._body_left -= take
                view = view[take:]
                if not self._body_left:
                    self._answer_upload()
                elif self._rate:
                    self._throttle()
                continue
            self._head += view
            view = memoryview(b"")
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, rest = bytes(self._head[:end]), bytes(self._head[end + 4 :])
            self._head = bytearray()
            self._request(head)
            view = memoryview(rest)

    def _request(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if not headers.get("authorization", "").startswith("Bearer "):
            self._respond(b"401 Unauthorized", b"no bearer token\n")
        elif "transfer-encoding" in headers:
            self._respond(b"501 Not Implemented", b"chunked bodies are not expected here\n")
        elif method == "GET" and target.startswith("/bytes/"):
            task = asyncio.get_running_loop().create_task(self._stream(int(target[7:])))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif method == "POST" and target.startswith("/upload"):
            _, _, query = target.partition("?rate=")
            self._rate = float(query) if query else 0.0
            self._body_left = int(headers.get("content-length", "0"))
            self._received = self._crc = 0
            self._started = time.monotonic()
            if not self._body_left:
                self._answer_upload()
        else:
            self._respond(b"404 Not Found", b"unknown path\n")

    def _respond(self, status: bytes, body: bytes) -> None:
        assert self._transport is not None
        self._transport.write(
            b"HTTP/1.1 %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
            % (status, len(body), body)
        )

    def _answer_upload(self) -> None:
        self._respond(b"200 OK", json.dumps({"bytes": self._received, "crc32": self._crc}).encode())

    def _throttle(self) -> None:
        """Slow reader of the request body: pause reading until the rate allows more."""
        transport = self._transport
        ahead = self._received / self._rate - (time.monotonic() - self._started)
        if transport is None or ahead <= 0.001 or self._paused:
            return
        self._paused = True
        transport.pause_reading()

        def resume() -> None:
            self._paused = False
            if not transport.is_closing():
                transport.resume_reading()

        asyncio.get_running_loop().call_later(ahead, resume)

    async def _stream(self, size: int) -> None:
        transport = self._transport
        assert transport is not None
        transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % size
        )
        view, left = memoryview(PATTERN), size
        while left and not transport.is_closing():
            take = min(left, len(PATTERN))
            transport.write(view[:take])
            left -= take
            await self._writable.wait()


async def _serve_upstream() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_UpstreamProtocol, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


def _upstream_main() -> int:
    try:
        import uvloop  # noqa: PLC0415 - only the upstream process wants it

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with contextlib.suppress(KeyboardInterrupt), runner:
        runner.run(_serve_upstream())
    return 0


@contextlib.contextmanager
def upstream_process() -> Iterator[int]:
    """``memory.py upstream`` in its own process; yields its port."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "upstream"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.isdigit():
            raise MemoryBenchError(f"the upstream did not start (said {line!r})")
        yield int(line)
    finally:
        _stop(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def _stop(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- the proxy process ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Credentials:
    """The route's OAuth2 client at the dev IdP."""

    token_url: str
    client_id: str
    secret: str
    resource: str
    scope: str = "read"


@dataclass(frozen=True, slots=True)
class ProxyProcess:
    pid: int
    port: int
    loop: str  # "uvloop" or "asyncio", as seen in the process's mapped libraries
    log: Path


def routes_yaml(creds: Credentials, upstream_port: int, port: int, admin: int) -> str:
    """One client, one route; limits set so that 1 GiB bodies and 10k idle clients fit."""
    return f"""\
proxy:
  listen: 127.0.0.1:{port}
  admin_listen: 127.0.0.1:{admin}
  unmatched: deny
  log_level: info              # one request_completed line per request, as in production
  max_body_bytes: null         # 1 GiB uploads
  max_connections: 12000       # 10,000 idle clients and room to spare
  client_idle_timeout_s: 600   # idle clients stay open for the whole measure
clients:
  mem:
    token_url: {creds.token_url}
    client_id: {creds.client_id}
    client_secret: ${{MEM_CLIENT_SECRET}}
routes:
  - host: {HOST}
    client: mem
    scope: {creds.scope}
    resource: {creds.resource}
    upstream: http://127.0.0.1:{upstream_port}
"""


@contextlib.contextmanager
def proxy_process(
    creds: Credentials, upstream_port: int, workdir: Path, *, use_uvloop: bool = True
) -> Iterator[ProxyProcess]:
    """``m2m-proxy run`` (``python -m m2m_proxy run``; with ``use_uvloop=False`` the same CLI
    with uvloop unimportable), ready, warmed up: token fetched, WARM_BYTES streamed both
    ways. Its log goes to a file in ``workdir``, quoted in any error."""
    port, admin = free_ports(2)
    config = workdir / f"routes-{port}.yaml"
    config.write_text(routes_yaml(creds, upstream_port, port, admin), encoding="utf-8")
    command = ["-m", "m2m_proxy"] if use_uvloop else ["-c", _NO_UVLOOP]
    log = workdir / f"proxy-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, *command, "run", "--config", str(config)],
            env={**os.environ, "MEM_CLIENT_SECRET": creds.secret},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        try:
            wait_proxy_ready(proc, f"http://127.0.0.1:{admin}/readyz", READY_TIMEOUT_S)
        except DevStackError as exc:
            raise MemoryBenchError(f"{exc}\n{_tail(log)}") from exc
        maps = Path(f"/proc/{proc.pid}/maps").read_text(encoding="utf-8")
        running = ProxyProcess(proc.pid, port, "uvloop" if "uvloop" in maps else "asyncio", log)
        if running.loop != ("uvloop" if use_uvloop else "asyncio"):
            raise MemoryBenchError(f"the proxy runs on {running.loop}, not the loop asked for")
        try:
            download(port, WARM_BYTES)
            upload(port, WARM_BYTES)
        except (OSError, MemoryBenchError) as exc:
            raise MemoryBenchError(f"warm-up failed: {exc}\n{_tail(log)}") from exc
        yield running
    finally:
        _stop(proc)


def _tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


# -- /proc ---------------------------------------------------------------------------------


def status_kib(pid: int, name: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise MemoryBenchError(f"no {name} in /proc/{pid}/status")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class RssWatch:
    """VmRSS sampled every SAMPLE_S while in the ``with`` block, and VmHWM (reset on entry
    through /proc/PID/clear_refs, so it is the peak of the block alone)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[int] = []
        self.before_kib = self.after_kib = self.hwm_kib = 0
        self.hwm_reset = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> RssWatch:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5", encoding="ascii")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False  # then the samples alone give the peak
        self.before_kib = status_kib(self.pid, "VmRSS")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.after_kib = status_kib(self.pid, "VmRSS")
        self.hwm_kib = status_kib(self.pid, "VmHWM")

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.samples.append(status_kib(self.pid, "VmRSS"))

    @property
    def peak_kib(self) -> int:
        return max([*self.samples, self.after_kib, *([self.hwm_kib] if self.hwm_reset else [])])


# -- clients (blocking sockets) ------------------------------------------------------------


def _connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(IO_TIMEOUT_S)
    sock.connect(("127.0.0.1", port))
    return sock


def _read_head(sock: socket.socket) -> tuple[int, int, bytes]:
    """Status, Content-Length and the bytes read past the head."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise MemoryBenchError(f"the proxy closed before a response head: {buf[:200]!r}")
        buf += data
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    length = -1
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return int(lines[0].split()[1]), length, rest


def _read_small_response(sock: socket.socket) -> tuple[int, bytes]:
    status, length, body = _read_head(sock)
    while len(body) < length:
        data = sock.recv(65536)
        if not data:
            break
        body += data
    return status, body


def _request(method: str, path: str, extra: str = "") -> bytes:
    return f"{method} http://{HOST}{path} HTTP/1.1\r\nHost: {HOST}\r\n{extra}\r\n".encode()


@dataclass(frozen=True, slots=True)
class Transfer:
    size: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.size / MIB / self.seconds if self.seconds else 0.0


def download(port: int, size: int, *, rate: float | None = None, stall_s: float = 0.0) -> Transfer:
    """GET SIZE bytes through the proxy, CRC-checked. ``rate`` (bytes/s): read no faster,
    in 64 KiB reads into a 64 KiB receive buffer; ``stall_s``: read nothing for that long
    after the head."""
    started = time.monotonic()
    with _connect(port, rcvbuf=64 * KIB if rate else None) as sock:
        sock.sendall(_request("GET", f"/bytes/{size}"))
        status, length, rest = _read_head(sock)
        if status != 200 or length != size:
            raise MemoryBenchError(f"download: {status}, Content-Length {length}, {rest[:200]!r}")
        time.sleep(stall_s)
        crc, got = zlib.crc32(rest), len(rest)
        buf = memoryview(bytearray(64 * KIB if rate else MIB))
        reading = time.monotonic()
        while got < size:
            count = sock.recv_into(buf, min(len(buf), size - got))
            if not count:
                raise MemoryBenchError(f"download: closed after {got} of {size} bytes")
            crc = zlib.crc32(buf[:count], crc)
            got += count
            if rate:
                ahead = got / rate - (time.monotonic() - reading)
                if ahead > 0:
                    time.sleep(ahead)
    if crc != pattern_crc(size):
        raise MemoryBenchError("download: the body differs from what the upstream sent")
    return Transfer(size, time.monotonic() - started)


def upload(port: int, size: int, *, upstream_rate: float | None = None) -> Transfer:
    """POST SIZE bytes (Content-Length) through the proxy as fast as the socket takes
    them; the upstream reads them at ``upstream_rate`` bytes/s if given and answers the
    length and CRC-32 it received, which must match."""
    path = "/upload" if upstream_rate is None else f"/upload?rate={upstream_rate:.0f}"
    started = time.monotonic()
    with _connect(port) as sock:
        sock.sendall(_request("POST", path, f"Content-Length: {size}\r\n"))
        view, left = memoryview(PATTERN), size
        while left:
            take = min(left, len(PATTERN))
            sock.sendall(view[:take])
            left -= take
        status, body = _read_small_response(sock)
    if status != 200:
        raise MemoryBenchError(f"upload: {status} {body[:200]!r}")
    answer = json.loads(body)
    if answer != {"bytes": size, "crc32": pattern_crc(size)}:
        raise MemoryBenchError(f"upload: the upstream received {answer}")
    return Transfer(size, time.monotonic() - started)


def open_idle(port: int, count: int, batch: int = 16) -> list[socket.socket]:
    """COUNT keep-alive connections, each after one GET answered 200, left open. Opened
    BATCH at a time (connect, send, read every answer), so the accept backlog never holds
    more than BATCH and the proxy needs at most BATCH upstream connections."""
    request = _request("GET", "/bytes/16")
    socks: list[socket.socket] = []
    try:
        while len(socks) < count:
            group = [_connect(port) for _ in range(min(batch, count - len(socks)))]
            socks.extend(group)
            for sock in group:
                sock.sendall(request)
            for sock in group:
                status, body = _read_small_response(sock)
                if status != 200 or body != PATTERN[:16]:
                    raise MemoryBenchError(f"idle connection {len(socks)}: {status} {body!r}")
    except BaseException:
        close_all(socks)
        raise
    return socks


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


# -- measures ------------------------------------------------------------------------------


@dataclass(slots=True)
class StreamMeasure:
    """One body through one fresh proxy process: RSS before, peak, after (KiB)."""

    name: str
    loop: str
    size: int
    seconds: float
    mb_per_s: float
    baseline_kib: int
    peak_kib: int
    after_kib: int
    hwm_kib: int
    samples: int

    @property
    def added_mib(self) -> float:
        return (self.peak_kib - self.baseline_kib) / KIB


@dataclass(slots=True)
class IdleMeasure:
    """COUNT idle keep-alive clients held by one fresh proxy process."""

    loop: str
    count: int
    open_seconds: float
    baseline_kib: int
    after_kib: int
    peak_kib: int
    fds_added: int
    after_close_kib: int = 0
    rechecked: int = 0

    @property
    def per_connection_kib(self) -> float:
        return (self.after_kib - self.baseline_kib) / self.count


@dataclass(slots=True)
class StreamSpec:
    name: str
    size: int
    kind: str  # download | upload
    rate: float | None = None
    stall_s: float = 0.0


def measure_stream(proxy: ProxyProcess, spec: StreamSpec) -> StreamMeasure:
    with RssWatch(proxy.pid) as watch:
        if spec.kind == "download":
            transfer = download(proxy.port, spec.size, rate=spec.rate, stall_s=spec.stall_s)
        else:
            transfer = upload(proxy.port, spec.size, upstream_rate=spec.rate)
        time.sleep(2 * SAMPLE_S)  # a last sample or two after the body's end
    return StreamMeasure(
        name=spec.name,
        loop=proxy.loop,
        size=spec.size,
        seconds=round(transfer.seconds, 3),
        mb_per_s=round(transfer.mb_per_s, 1),
        baseline_kib=watch.before_kib,
        peak_kib=watch.peak_kib,
        after_kib=watch.after_kib,
        hwm_kib=watch.hwm_kib,
        samples=len(watch.samples),
    )


def measure_idle(proxy: ProxyProcess, count: int, settle_s: float = 1.0) -> IdleMeasure:
    """Open COUNT idle clients, let the proxy settle, read its RSS; then check that every
    100th connection still answers a second request, and close them all."""
    fds = open_fds(proxy.pid)
    with RssWatch(proxy.pid) as watch:
        started = time.monotonic()
        socks = open_idle(proxy.port, count)
        opened = time.monotonic() - started
        try:
            time.sleep(settle_s)
            after = status_kib(proxy.pid, "VmRSS")
            fds_added = open_fds(proxy.pid) - fds
            again = _request("GET", "/bytes/16")
            checked = socks[::100]
            for sock in checked:
                sock.sendall(again)
            for sock in checked:
                status, _ = _read_small_response(sock)
                if status != 200:
                    raise MemoryBenchError(f"an idle connection answered {status} later")
        finally:
            close_all(socks)
    time.sleep(settle_s)
    return IdleMeasure(
        loop=proxy.loop,
        count=count,
        open_seconds=round(opened, 2),
        baseline_kib=watch.before_kib,
        after_kib=after,
        peak_kib=watch.peak_kib,
        fds_added=fds_added,
        after_close_kib=status_kib(proxy.pid, "VmRSS"),
        rechecked=len(checked),
    )


# -- the command ---------------------------------------------------------------------------


def _specs(args: argparse.Namespace) -> list[StreamSpec]:
    size, slow = args.size * MIB, args.slow_size * MIB
    rate = args.slow_rate * MIB
    return [
        StreamSpec("download", size, "download"),
        StreamSpec("upload", size, "upload"),
        StreamSpec("slow reader", slow, "download", rate=rate, stall_s=args.stall),
        StreamSpec("upload, slow upstream", slow, "upload", rate=rate),
    ]


def _run(args: argparse.Namespace) -> dict[str, Any]:
    loops = [name.strip() for name in args.loops.split(",") if name.strip()]
    streams: list[StreamMeasure] = []
    idles: list[IdleMeasure] = []
    with (
        DevStack(ROOT, token_ttl_s=3600) as stack,
        upstream_process() as upstream_port,
        tempfile.TemporaryDirectory(prefix="m2m-memory-") as tmp,
    ):
        creds = Credentials(
            stack.token_url, "demo-basic", stack.dev_client_secret, "http://api.demo.local"
        )
        for loop in loops:
            for spec in _specs(args):
                with proxy_process(
                    creds, upstream_port, Path(tmp), use_uvloop=loop == "uvloop"
                ) as proxy:
                    result = measure_stream(proxy, spec)
                streams.append(result)
                print(
                    f"  {loop:7} {spec.name:22} +{result.added_mib:6.1f} MiB"
                    f"  ({result.mb_per_s:.0f} MiB/s)",
                    flush=True,
                )
            if args.idle:
                with proxy_process(
                    creds, upstream_port, Path(tmp), use_uvloop=loop == "uvloop"
                ) as proxy:
                    idle = measure_idle(proxy, args.idle)
                idles.append(idle)
                print(
                    f"  {loop:7} {args.idle} idle connections"
                    f"  {idle.per_connection_kib:.2f} KiB each",
                    flush=True,
                )
    return {
        "streams": streams,
        "idles": idles,
    }


def _table(streams: list[StreamMeasure], idles: list[IdleMeasure]) -> str:
    rows = [
        "| loop | measure | body | RSS before MiB | peak MiB | added MiB | MiB/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    rows += [
        f"| {m.loop} | {m.name} | {m.size // MIB} MiB | {m.baseline_kib / KIB:.1f} "
        f"| {m.peak_kib / KIB:.1f} | {m.added_mib:.1f} | {m.mb_per_s:.0f} |"
        for m in streams
    ]
    if idles:
        rows += [
            "",
            "| loop | idle keep-alive clients | RSS before MiB | RSS with them MiB "
            "| KiB per connection | fds added | opened in s | RSS after closing MiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        rows += [
            f"| {i.loop} | {i.count:,} | {i.baseline_kib / KIB:.1f} | {i.after_kib / KIB:.1f} "
            f"| {i.per_connection_kib:.2f} | {i.fds_added:,} | {i.open_seconds:.1f} "
            f"| {i.after_close_kib / KIB:.1f} |"
            for i in idles
        ]
    rows += [
        "",
        "added = peak RSS during the body (VmRSS every 50 ms, VmHWM) - RSS just before it; "
        "MiB/s of the slow reader include its stall.",
    ]
    return "\n".join(rows)


def _verdicts(streams: list[StreamMeasure], idles: list[IdleMeasure]) -> list[str]:
    """Failed targets, as lines; empty when every target holds."""
    failed = [
        f"{m.loop} {m.name}: +{m.added_mib:.1f} MiB >= {STREAM_TARGET_MIB} MiB"
        for m in streams
        if m.added_mib >= STREAM_TARGET_MIB
    ]
    failed += [
        f"{i.loop} idle: {i.per_connection_kib:.2f} KiB >= {IDLE_TARGET_KIB} KiB per connection"
        for i in idles
        if i.per_connection_kib >= IDLE_TARGET_KIB
    ]
    return failed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["upstream"]:
        return _upstream_main()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", type=int, default=1024, help="MiB per download/upload")
    parser.add_argument("--slow-size", type=int, default=256, help="MiB of the slow cases")
    parser.add_argument("--slow-rate", type=float, default=32, help="MiB/s of the slow side")
    parser.add_argument("--stall", type=float, default=2.0, help="s the slow reader waits")
    parser.add_argument("--idle", type=int, default=10000, help="idle clients (0: skip)")
    parser.add_argument("--loops", default="uvloop,asyncio", help="uvloop, asyncio or both")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = datetime.now(UTC)
    try:
        results = _run(args)
    except MemoryBenchError as exc:
        print(f"bench/memory.py: {exc}", file=sys.stderr)
        return 1
    streams: list[StreamMeasure] = results["streams"]
    idles: list[IdleMeasure] = results["idles"]
    failed = _verdicts(streams, idles)
    print()
    print(_table(streams, idles))
    print()
    print(
        "targets: < 50 MiB added per streamed body, < 20 KiB per idle connection: "
        + ("all hold" if not failed else "MISSED: " + "; ".join(failed))
    )
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    report = {
        "started": started.isoformat(timespec="seconds"),
        "commit": commit,
        "machine": {
            "nproc": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": vars(args) | {"output": str(args.output)},
        "targets": {"stream_added_mib": STREAM_TARGET_MIB, "idle_kib": IDLE_TARGET_KIB},
        "streams": [asdict(m) | {"added_mib": round(m.added_mib, 2)} for m in streams],
        "idle": [asdict(i) | {"per_connection_kib": round(i.per_connection_kib, 3)} for i in idles],
        "failed": failed,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"written: {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
