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


def default_responder(_request: CapturedRequest) -> Answer:
    return Answer()


@dataclass
class CaptureUpstream:
    port: int = 0
    connections: list[CapturedConnection] = field(default_factory=list)
    requests: list[CapturedRequest] = field(default_factory=list)
    responder: Responder = default_responder

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def errors(self) -> list[str]:
        return [c.error for c in self.connections if c.error is not None]

    def reset(self) -> None:
        self.connections.clear()
        self.requests.clear()
        self.responder = default_responder

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
                elif event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
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
    writers: set[asyncio.StreamWriter] = set()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            handlers.add(task)
        writers.add(writer)
        try:
            await state._serve(reader, writer)
        finally:
            writers.discard(writer)
            if task is not None:
                handlers.discard(task)

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    state.port = int(server.sockets[0].getsockname()[1])
    try:
        yield state
    finally:
        server.close()
        for writer in list(writers):
            writer.transport.abort()  # the handler sees EOF and ends by itself
        if handlers:
            await asyncio.wait(list(handlers), timeout=2)
        await server.wait_closed()


# -- the client side -----------------------------------------------------------------------


@dataclass
class ParsedResponse:
    status: int
    headers: RawHeaders
    body: bytes
    http_version: bytes = b"1.1"

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

    @property
    def versions(self) -> list[bytes]:
        """The HTTP version of each response's status line."""
        return [r.http_version for r in self.responses]


CUT = "the connection closed in the middle of a response"


class _Splitter:
    """h11 in the client role, fed a whole byte string as if GETs had been pipelined."""

    def __init__(self, method: bytes) -> None:
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=4 * 1024 * 1024)
        self.method = method
        self.responses: list[ParsedResponse] = []
        self.current: ParsedResponse | None = None
        self._ask()

    def _ask(self) -> None:
        self.conn.send(h11.Request(method=self.method, target="/", headers=[("Host", "x")]))
        self.conn.send(h11.EndOfMessage())

    def between_responses(self) -> bool:
        return self.current is None and not self.conn.trailing_data[0]

    def take(self, event: h11.Event) -> str | None:
        """Record ``event``; a reason to stop, or None to go on."""
        if isinstance(event, h11.Response):
            self.current = ParsedResponse(
                event.status_code,
                [(bytes(k), bytes(v)) for k, v in event.headers.raw_items()],
                b"",
                bytes(event.http_version),
            )
        elif isinstance(event, h11.Data) and self.current is not None:
            self.current.body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage) and self.current is not None:
            self.responses.append(self.current)
            self.current = None
            if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                self.conn.start_next_cycle()
                self._ask()
            elif self.conn.their_state is h11.MUST_CLOSE:
                return "closing" if not self.conn.trailing_data[0] else "trailing"
        elif isinstance(event, h11.ConnectionClosed):
            return "closing"
        return None


def parse_responses(raw: bytes, *, closed: bool, head_only: bool = False) -> Reply:
    """Split ``raw`` into responses with h11 as client (as if GETs were pipelined).

    ``error`` is set when the bytes are not a sequence of complete HTTP/1.x responses:
    h11 refuses them, a response is cut short (:data:`CUT`), or bytes follow a response
    that closes the connection.
    """
    splitter = _Splitter(b"HEAD" if head_only else b"GET")
    conn = splitter.conn
    if raw:
        conn.receive_data(raw)  # b"" would mean EOF to h11
    eof_fed = False
    error: str | None = None
    try:
        while True:
            event = conn.next_event()
            if not isinstance(event, h11.Event):  # NEED_DATA or PAUSED
                if event is h11.PAUSED or splitter.between_responses() or not closed:
                    break  # a clean end, or more may come
                if eof_fed:
                    error = CUT
                    break
                conn.receive_data(b"")
                eof_fed = True
                continue
            stop = splitter.take(event)
            if stop == "trailing":
                error = "bytes after a response that closes the connection"
            if stop is not None:
                break
    except (h11.RemoteProtocolError, h11.LocalProtocolError) as exc:
        error = CUT if eof_fed else f"{type(exc).__name__}: {exc}"
    return Reply(raw, closed, splitter.responses, error, 0.0)


async def exchange(
    port: int,
    data: bytes,
    *,
    quiet_s: float = 0.2,
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


# -- a hostile upstream ---------------------------------------------------------------------

RawScript = Callable[[CapturedRequest], bytes]
"""The exact bytes to answer a request with (status line, headers, body, anything)."""


@dataclass
class RawUpstream:
    """Parses requests with h11 like :class:`CaptureUpstream` but answers each with
    scripted raw bytes, which may be malformed, ambiguous or carry extra data."""

    script: RawScript
    port: int = 0
    requests: list[CapturedRequest] = field(default_factory=list)
    connections: int = 0
    close_after: bool = False
    """Close the connection after each answer."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        leftover = b""
        try:
            while True:
                conn = h11.Connection(h11.SERVER)
                if leftover:
                    conn.receive_data(leftover)
                request: CapturedRequest | None = None
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await reader.read(65536)
                        conn.receive_data(data)
                        if not data and request is None:
                            return
                        continue
                    if isinstance(event, h11.Request):
                        request = CapturedRequest(
                            bytes(event.method),
                            bytes(event.target),
                            bytes(event.http_version),
                            [(bytes(k), bytes(v)) for k, v in event.headers.raw_items()],
                            index,
                        )
                        self.requests.append(request)
                    elif isinstance(event, h11.Data) and request is not None:
                        request.body += bytes(event.data)
                    elif isinstance(event, h11.EndOfMessage) and request is not None:
                        request.complete = True
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                leftover = conn.trailing_data[0]
                writer.write(self.script(request))
                await writer.drain()
                if self.close_after:
                    return
        except (h11.RemoteProtocolError, ConnectionError):
            return
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@asynccontextmanager
async def raw_upstream(script: RawScript) -> AsyncIterator[RawUpstream]:
    state = RawUpstream(script)
    handlers: set[asyncio.Task[None]] = set()
    writers: set[asyncio.StreamWriter] = set()

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            handlers.add(task)
        writers.add(writer)
        try:
            await state._serve(reader, writer)
        finally:
            writers.discard(writer)
            if task is not None:
                handlers.discard(task)

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    state.port = int(server.sockets[0].getsockname()[1])
    try:
        yield state
    finally:
        server.close()
        for writer in list(writers):
            writer.transport.abort()
        if handlers:
            await asyncio.wait(list(handlers), timeout=2)
        await server.wait_closed()
