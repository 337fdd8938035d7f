"""A bounded fuzz run of the proxy's front door through real sockets.

Valid requests (a small corpus) are mutated by a seeded random mutator and sent to a
running proxy for ``M2M_FUZZ_SECONDS`` (default 10) from several concurrent workers, each
with its own route and capture upstream so every exchange can be accounted for.
``M2M_FUZZ_SEED`` picks the mutations (default 20261126; the run is printed with it).

For every connection:

- the proxy's answer parses as HTTP/1.x responses (h11, client role), or the proxy closes
  the connection; once the client has sent EOF the proxy closes within ``EOF_CLOSE_S``;
- no 5xx other than 501/505 (the upstreams are healthy, so a 500/502/504 is a proxy bug);
- whatever reached an upstream parses with h11 and is a clean routed request (one
  Authorization with the route's token, no hop-by-hop field, framing matching the body);
- every request the upstream answered was answered to the client (no smuggled extras);
- the sentinel secret and token appear in no response and no log line.

Afterwards the proxy still serves a plain request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from tests.functional.support import SENTINEL_TOKEN, fake_server, running_proxy, token_answer
from tests.security.capture import (
    CUT,
    Answer,
    CapturedRequest,
    CaptureUpstream,
    Reply,
    capture_upstream,
    parse_responses,
)
from tests.security.rig import BEARER, NEEDLES, assert_clean_upstream_request

FUZZ_SECONDS = float(os.environ.get("M2M_FUZZ_SECONDS", "10"))
FUZZ_SEED = int(os.environ.get("M2M_FUZZ_SEED", "20261126"))
WORKERS = 6
QUIET_S = 0.15
"""Silence after a complete response before the client says EOF."""
FIRST_RESPONSE_S = 0.5
"""How long the client waits for any answer before it says EOF."""
EOF_CLOSE_S = 3.0
"""After the client's EOF the proxy must close within this long."""


def host_of(worker: int) -> str:
    return f"w{worker}.fuzz.test"


def corpus(host: str) -> list[bytes]:
    """Valid requests the mutator starts from."""
    chunked = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    requests = [
        f"GET http://{host}/a?x=1 HTTP/1.1\r\nHost: {host}\r\n\r\n",
        f"GET /b HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\nUser-Agent: fuzz\r\n\r\n",
        f"POST http://{host}/c HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n"
        "Content-Type: text/plain\r\n\r\nhello",
        f"POST http://{host}/d HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked.decode(),
        f"GET http://{host}/e HTTP/1.1\r\nHost: {host}\r\n\r\n"
        f"GET http://{host}/f HTTP/1.1\r\nHost: {host}\r\n\r\n",
        f"PUT http://{host}/g HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\n"
        "Expect: 100-continue\r\n\r\nabc",
        f"DELETE http://{host}/h HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
        f"OPTIONS http://{host}/i HTTP/1.1\r\nHost: {host}\r\n\r\n",
        f"GET http://{host}/j HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive, X-Hop\r\n"
        "X-Hop: 1\r\nAuthorization: Bearer client-own\r\nProxy-Authorization: Basic eDp5\r\n"
        "Cookie: a=b\r\nX-Forwarded-For: 192.0.2.1\r\n\r\n",
        f"GET http://{host}/k HTTP/1.0\r\nHost: {host}\r\n\r\n",
        f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n",
        "GET http://unrouted.fuzz.test/l HTTP/1.1\r\nHost: unrouted.fuzz.test\r\n\r\n",
        f"PATCH /m HTTP/1.1\r\nHost: {host}:80\r\nContent-Length: 0\r\n\r\n",
    ]
    return [r.encode() for r in requests]


DICTIONARY = [
    b"\r\n",
    b"\n",
    b"\r",
    b"\x00",
    b" ",
    b"\t",
    b"\x0b",
    b":",
    b",",
    b";",
    b"0",
    b"5",
    b"ffffffff",
    b"-1",
    b"chunked",
    b"identity",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding : chunked\r\n",
    b"Content-Length: 0\r\n",
    b"Content-Length: 5\r\n",
    b"Content-Length: 99999999999\r\n",
    b"Connection: close\r\n",
    b"Connection: Authorization\r\n",
    b"Host: other.fuzz.test\r\n",
    b"Authorization: Bearer x\r\n",
    b"X_Under: 1\r\n",
    b" folded\r\n",
    b"\r\n\r\n",
    b"0\r\n\r\n",
    b"HTTP/1.1",
    b"HTTP/1.0",
    b"GET / HTTP/1.1\r\n",
    b"http://",
    b"@",
    b"#",
    b"?",
    b"%",
    b"/../",
    b"\xff",
    b"\xc3\xa9",
    b"[::1]",
    b":0",
    b":65536",
]


def mutate(rng: random.Random, seed: bytes, pool: list[bytes]) -> bytes:
    """One to four random edits of ``seed``."""
    data = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(data) + 1)
        kind = rng.randrange(9)
        if kind == 0 and data:  # flip a byte
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif kind == 1:  # insert a dictionary token
            data[at:at] = rng.choice(DICTIONARY)
        elif kind == 2 and data:  # delete a range
            data[at : at + rng.randint(1, 12)] = b""
        elif kind == 3 and data:  # duplicate a range
            chunk = data[at : at + rng.randint(1, 40)]
            data[at:at] = chunk
        elif kind == 4:  # truncate
            del data[at:]
        elif kind == 5:  # pipeline another request
            data += rng.choice(pool)
        elif kind == 6:  # swap case of a range
            end = min(len(data), at + rng.randint(1, 16))
            data[at:end] = bytes(data[at:end]).swapcase()
        elif kind == 7:  # replace a line ending
            data = bytearray(bytes(data).replace(b"\r\n", rng.choice([b"\n", b"\r", b"\r\r\n"]), 1))
        else:  # a long run of one byte
            data[at:at] = bytes([rng.randrange(256)]) * rng.choice([100, 1000, 9000])
    return bytes(data)


@dataclass
class Outcome:
    data: bytes
    reply: Reply
    eof_sent: bool


@dataclass
class FuzzStats:
    connections: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    endings: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def fail(self, worker: int, iteration: int, data: bytes, why: str) -> None:
        self.failures.append(f"worker {worker} #{iteration}: {why}\n    input: {data!r}")


async def one_connection(port: int, data: bytes) -> Outcome:
    """Send ``data``, listen, say EOF when it goes quiet, wait for the proxy to close."""
    raw = bytearray()
    closed = eof_sent = False
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(data)
            await writer.drain()
        deadline = time.monotonic() + FIRST_RESPONSE_S
        while not closed:
            have = bool(parse_responses(bytes(raw), closed=False).responses)
            wait = QUIET_S if have else deadline - time.monotonic()
            if wait <= 0:
                break
            try:
                chunk = await asyncio.wait_for(reader.read(65536), wait)
            except TimeoutError:
                break
            except ConnectionError:
                chunk = b""
            raw += chunk
            closed = not chunk
        if not closed:
            eof_sent = True
            with contextlib.suppress(ConnectionError, OSError):
                writer.write_eof()
            deadline = time.monotonic() + EOF_CLOSE_S
            while not closed and time.monotonic() < deadline:
                try:
                    chunk = await asyncio.wait_for(
                        reader.read(65536), max(0.01, deadline - time.monotonic())
                    )
                except TimeoutError:
                    break
                except ConnectionError:
                    chunk = b""
                raw += chunk
                closed = not chunk
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return Outcome(data, parse_responses(bytes(raw), closed=closed), eof_sent)


def judge(outcome: Outcome, upstream: list[CapturedRequest], worker: int) -> list[str]:
    """The failures of one exchange; ``upstream``: what it caused upstream."""
    failures: list[str] = []
    reply = outcome.reply
    if not reply.closed:
        failures.append(f"still open {EOF_CLOSE_S} s after the client's EOF")
    cut = reply.error == CUT
    if reply.error is not None and not (cut and outcome.eof_sent):
        failures.append(f"malformed answer: {reply.error}; raw={reply.raw[:300]!r}")
    for needle in NEEDLES:
        if needle in reply.raw:
            failures.append(f"{needle!r} sent back to the client")
    for response in reply.responses:
        if response.http_version not in (b"1.0", b"1.1"):
            failures.append(f"status line in HTTP/{response.http_version.decode()}")
        if response.status >= 500 and response.status not in (501, 505):
            failures.append(f"status {response.status}: {response.body[:200]!r}")
    marked = sum(1 for r in reply.responses if r.header("X-Capture") == [str(worker).encode()])
    if len(upstream) != marked:
        failures.append(
            f"{len(upstream)} request(s) reached the upstream, {marked} upstream answer(s) "
            f"reached the client: {[r.target for r in upstream]}"
        )
    for request in upstream:
        try:
            assert_clean_upstream_request(request, bearer=BEARER)
        except AssertionError as exc:
            failures.append(f"unclean upstream request {request.target!r}: {exc}")
    return failures


def _answer_as(worker: int) -> Callable[[CapturedRequest], Answer]:
    def answer(_request: CapturedRequest) -> Answer:
        return Answer(200, (("X-Capture", str(worker)),), b"fz")

    return answer


async def _worker(
    worker: int,
    port: int,
    upstream: CaptureUpstream,
    stats: FuzzStats,
    deadline: float,
) -> None:
    rng = random.Random(FUZZ_SEED * 1000 + worker)  # noqa: S311 - reproducible, not crypto
    pool = corpus(host_of(worker))
    iteration = 0
    while time.monotonic() < deadline:
        iteration += 1
        data = mutate(rng, rng.choice(pool), pool)
        before = len(upstream.requests)
        outcome = await one_connection(port, data)
        # Let a forwarded request's record settle before accounting for it.
        for _ in range(50):
            caused = upstream.requests[before:]
            marked = sum(1 for r in outcome.reply.responses if r.header("X-Capture"))
            if len(caused) <= marked and all(r.complete for r in caused):
                break
            await asyncio.sleep(0.01)
        caused = upstream.requests[before:]
        stats.connections += 1
        stats.statuses.update(outcome.reply.statuses)
        stats.endings["eof by client" if outcome.eof_sent else "closed/answered"] += 1
        failures = judge(outcome, caused, worker)
        for why in failures:
            stats.fail(worker, iteration, data, why)
        if upstream.errors:
            stats.fail(worker, iteration, data, f"the upstream could not parse: {upstream.errors}")
            upstream.connections.clear()


def _routes(idp: str, upstreams: list[CaptureUpstream]) -> str:
    routes = "".join(
        f"  - host: {host_of(i)}\n    client: svc\n    upstream: {u.url}\n"
        for i, u in enumerate(upstreams)
    )
    return f"""
proxy:
  unmatched: deny
  idle_timeout_s: 5
clients:
  svc:
    token_url: {idp}/token
    client_id: svc
    client_secret: ${{SENTINEL_SECRET}}
routes:
{routes}"""


@pytest.mark.timeout(FUZZ_SECONDS + 50)
async def test_fuzzed_requests_never_crash_hang_smuggle_or_leak() -> None:
    async def idp(_request: web.Request) -> web.Response:
        return token_answer(SENTINEL_TOKEN)

    stats = FuzzStats()
    async with contextlib.AsyncExitStack() as stack:
        idp_server = await stack.enter_async_context(fake_server(idp))
        upstreams = [await stack.enter_async_context(capture_upstream()) for _ in range(WORKERS)]
        for index, upstream in enumerate(upstreams):
            upstream.responder = _answer_as(index)
        proxy = await stack.enter_async_context(running_proxy(_routes(idp_server.url, upstreams)))
        port = proxy.server.proxy_port
        deadline = time.monotonic() + FUZZ_SECONDS
        await asyncio.gather(
            *(_worker(i, port, u, stats, deadline) for i, u in enumerate(upstreams))
        )
        # Still alive and serving.
        after = await one_connection(
            port, f"GET http://{host_of(0)}/after HTTP/1.1\r\nHost: {host_of(0)}\r\n\r\n".encode()
        )
        assert after.reply.statuses == [200], after.reply
        logs = proxy.logs.getvalue().encode()
    print(
        f"\nfuzz: seed={FUZZ_SEED} seconds={FUZZ_SECONDS} connections={stats.connections} "
        f"statuses={dict(sorted(stats.statuses.items()))} endings={dict(stats.endings)}"
    )
    for needle in NEEDLES:
        assert needle not in logs, f"{needle!r} in the proxy's logs"
    assert stats.connections > 0
    assert not stats.failures, f"{len(stats.failures)} failure(s), seed {FUZZ_SEED}:\n" + (
        "\n".join(stats.failures[:10])
    )
