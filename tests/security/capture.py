"""A capture upstream (raw asyncio + h11, server role) and a raw HTTP client.

The upstream records exactly what reached it: every connection's raw bytes, each
request's line, header pairs as raw bytes (original case and order), body, trailers,
and anything h11 refused to parse. The client side writes arbitrary bytes to the
proxy and parses whatever comes back with h11 (client role), so a malformed answer
from the proxy is noticed rather than tolerated.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import h11

RawHeaders = list[tuple[bytes, bytes]]


@dataclass
class CapturedRequest:
    method: bytes
    target: bytes
    http_version: bytes
    headers: RawHeaders
    connection: int
    """Index of the upstream connection the request came on (reuse shows as repeats)."""
    body: bytearray = field(default_factory=bytearray)
    trailers: RawHeaders = field(default_factory=list)
    complete: bool = False

    def header(self, name: str) -> list[bytes]:
        """Every value of ``name`` (case-insensitive), in order."""
        wanted = name.lower().encode()
        return [v for k, v in self.headers if k.lower() == wanted]

    def names(self) -> list[bytes]:
        return [k.lower() for k, _ in self.headers]


@dataclass
class CapturedConnection:
    raw: bytearray = field(default_factory=bytearray)
    error: str | None = None
    """h11's complaint about the bytes, if it could not parse them."""


@dataclass(frozen=True)
class Answer:
    status: int = 200
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "text/plain"),)
    body: bytes = b"upstream-ok"


Responder = Callable[[CapturedRequest], Answer]


def _default_responder(_request: CapturedRequest) -> Answer:
    return Answer()


@dataclass
class CaptureUpstream:
    port: int = 0
    connections: list[CapturedConnection] = field(default_factory=list)
    requests: list[CapturedRequest] = field(default_factory=list)
    responder: Responder = _default_responder

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def errors(self) -> list[str]:
        return [c.error for c in self.connections if c.error is not None]

    def reset(self) -> None:
        self.connections.clear()
        self.requests.clear()
        self.responder = _default_responder

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        record = CapturedConnection()
        self.connections.append(record)
        index = len(self.connections) - 1
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=4 * 1024 * 1024)
        current: CapturedRequest | None = None
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    record.raw += data
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    current = CapturedRequest(
                        method=bytes(event.method),
                        target=bytes(event.target),
                        http_version=bytes(event.http_version),
                        headers=[(bytes(k), bytes(v)) for k, v in event.headers.raw_items()],
                        connection=index,
                    )
                    self.requests.append(current)
                elif isinstance(event, h11.Data) and current is not None:
                    current.body += bytes(event.data)
                elif isinstance(event, h11.EndOfMessage) and current is not None:
                    current.trailers = [(bytes(k), bytes(v)) for k, v in event.headers.raw_items()]
                    current.complete = True
                    answer = self.responder(current)
                    headers = [*answer.headers, ("Content-Length", str(len(answer.body)))]
                    out = conn.send(h11.Response(status_code=answer.status, headers=headers))
                    out = (out or b"") + (conn.send(h11.Data(data=answer.body)) or b"")
                    out += conn.send(h11.EndOfMessage()) or b""
                    writer.write(out)
                    await writer.drain()
                    if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                        break
                    conn.start_next_cycle()
                    current = None
                elif isinstance(event, h11.ConnectionClosed | h11.PAUSED):
                    break
        except h11.RemoteProtocolError as exc:
            record.error = f"{exc} (status hint {exc.error_status_hint})"
        except (ConnectionError, h11.LocalProtocolError) as exc:
            record.error = record.error or f"{type(exc).__name__}: {exc}"
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@asynccontextmanager
async def capture_upstream() -> AsyncIterator[CaptureUpstream]:
    state = CaptureUpstream()
    handlers: set[asyncio.Task[None]] = set()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            handlers.add(task)
        try:
            await state._serve(reader, writer)
        finally:
            if task is not None:
                handlers.discard(task)

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    state.port = int(server.sockets[0].getsockname()[1])
    try:
        yield state
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


# -- the client side -----------------------------------------------------------------------


@dataclass
class ParsedResponse:
    status: int
    headers: RawHeaders
    body: bytes

    def header(self, name: str) -> list[bytes]:
        wanted = name.lower().encode()
        return [v for k, v in self.headers if k.lower() == wanted]


@dataclass
class Reply:
    """Everything the proxy sent back on one connection, and how it ended."""

    raw: bytes
    closed: bool
    """The proxy closed the connection (EOF or reset) while we listened."""
    responses: list[ParsedResponse]
    error: str | None
    """h11 could not parse the bytes as HTTP/1.1 responses (or a response was cut)."""
    elapsed_s: float

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]

    @property
    def status(self) -> int | None:
        return self.responses[0].status if self.responses else None


def parse_responses(raw: bytes, *, closed: bool, head_only: bool = False) -> Reply:
    """Split ``raw`` into responses with h11 as client (as if GETs were pipelined)."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=4 * 1024 * 1024)
    responses: list[ParsedResponse] = []
    error: str | None = None
    method = b"HEAD" if head_only else b"GET"

    def send_request() -> None:
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())

    send_request()
    conn.receive_data(raw)
    if closed:
        conn.receive_data(b"")
    current: ParsedResponse | None = None
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                if event is h11.PAUSED and current is None and conn.our_state is h11.DONE:
                    conn.start_next_cycle()
                    send_request()
                    continue
                if closed and event is h11.NEED_DATA:
                    error = "the connection closed in the middle of a response"
                break
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                current = ParsedResponse(
                    event.status_code,
                    [(bytes(k), bytes(v)) for k, v in event.headers.raw_items()],
                    b"",
                )
            elif isinstance(event, h11.Data) and current is not None:
                current.body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage) and current is not None:
                responses.append(current)
                current = None
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                    send_request()
            elif isinstance(event, h11.ConnectionClosed):
                break
    except (h11.RemoteProtocolError, h11.LocalProtocolError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    if not responses and error is None and raw:
        error = "an incomplete response"
    return Reply(raw, closed, responses, error, 0.0)


async def exchange(
    port: int,
    data: bytes,
    *,
    quiet_s: float = 0.3,
    timeout_s: float = 10.0,
    head_only: bool = False,
) -> Reply:
    """Write ``data`` to the proxy; read until it closes, or ``quiet_s`` of silence after
    at least one full response, or ``timeout_s``."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    raw = bytearray()
    closed = False
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        deadline = started + timeout_s
        while True:
            have_response = bool(parse_responses(bytes(raw), closed=False).responses)
            wait = quiet_s if have_response else deadline - time.monotonic()
            wait = min(wait, deadline - time.monotonic())
            if wait <= 0:
                break
            try:
                chunk = await asyncio.wait_for(reader.read(65536), wait)
            except TimeoutError:
                break
            except ConnectionError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            raw += chunk
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    reply = parse_responses(bytes(raw), closed=closed, head_only=head_only)
    reply.elapsed_s = time.monotonic() - started
    return reply
