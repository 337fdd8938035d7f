"""A scripted HTTP/1.1 upstream on 127.0.0.1 for the upstream client's tests.

Each request is parsed with h11 (a strict, independent parser: a request the lean
client framed wrongly fails here) and recorded with its raw header casing and body;
the answer is whatever bytes the test's ``respond`` returns, so responses can be
exactly as odd as a test needs (chunked, close-delimited, 1xx, truncated ...).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import h11


@dataclass
class Received:
    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    """As sent: names in their original case, in order."""
    body: bytes
    connection: int
    """Which accepted connection (0, 1, ...) carried it."""
    index: int
    """Its position on that connection (0: first)."""
    pipelined: bool = False
    """Bytes of a next request had arrived before this one was answered."""

    def header(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class Answer:
    data: bytes
    close: bool = False
    """Close the connection after writing (FIN)."""
    delay_s: float = 0.0


Respond = Callable[[Received], Answer | Awaitable[Answer]]


@dataclass
class Peer:
    port: int
    received: list[Received] = field(default_factory=list)
    connections: int = 0
    closed_by_client: int = 0
    """Connections on which the client closed (EOF) or reset while idle."""
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def response(
    status: int = 200,
    body: bytes = b"",
    headers: list[tuple[str, str]] | None = None,
    *,
    reason: str = "OK",
    length: bool = True,
) -> bytes:
    """A response with Content-Length (unless ``length`` is False or given headers set it)."""
    lines = [f"HTTP/1.1 {status} {reason}"]
    given = headers or []
    lines += [f"{k}: {v}" for k, v in given]
    names = {k.lower() for k, _ in given}
    if length and "content-length" not in names and "transfer-encoding" not in names:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(
    status: int, chunks: list[bytes], headers: list[tuple[str, str]] | None = None
) -> bytes:
    head = response(status, b"", [*(headers or []), ("Transfer-Encoding", "chunked")])
    return head + b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


async def _read_request(
    reader: asyncio.StreamReader, leftover: bytes
) -> tuple[h11.Request, bytes, bytes] | None:
    """One request (head event, body, bytes after it), or None at a clean EOF."""
    conn = h11.Connection(h11.SERVER)
    if leftover:
        conn.receive_data(leftover)  # b"" would mean EOF to h11
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            if not data and head is None and not conn.trailing_data[0]:
                return None
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return head, bytes(body), conn.trailing_data[0]
        elif isinstance(event, h11.ConnectionClosed):
            return None


@asynccontextmanager
async def peer(respond: Respond, *, tls: ssl.SSLContext | None = None) -> AsyncIterator[Peer]:
    state = Peer(port=0)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = state.connections
        state.connections += 1
        state.writers.append(writer)
        leftover = b""
        index = 0
        try:
            while True:
                try:
                    parsed = await _read_request(reader, leftover)
                except (ConnectionError, h11.RemoteProtocolError):
                    parsed = None
                if parsed is None:
                    state.closed_by_client += 1
                    return
                head, body, leftover = parsed
                received = Received(
                    method=head.method.decode(),
                    target=head.target.decode(),
                    headers=list(head.headers.raw_items()),
                    body=body,
                    connection=number,
                    index=index,
                    pipelined=bool(leftover),
                )
                index += 1
                state.received.append(received)
                answer = respond(received)
                if not isinstance(answer, Answer):
                    answer = await answer
                if answer.delay_s:
                    await asyncio.sleep(answer.delay_s)
                writer.write(answer.data)
                await writer.drain()
                if answer.close:
                    return
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        for writer in state.writers:
            writer.close()
        await server.wait_closed()
