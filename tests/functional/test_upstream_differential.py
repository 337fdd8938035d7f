"""Differential: the same randomized exchanges through a proxy on the lean upstream
client and one on aiohttp's, to the same capture upstream.

The upstream parses what it receives with h11; the client sends and parses with h11.
Both sides must see the same thing through either proxy, byte for byte, except for
the differences listed (and justified) in ``normalize_response`` below.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import h11
from aiohttp import web

from tests.functional.support import RunningProxy, fake_server, running_proxy, token_answer
from tests.functional.upstream_peer import Answer, Peer, Received, peer

SEED = 20261126
CASES = 80
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
WITH_BODY = ("POST", "PUT", "PATCH")
KINDS = ("length", "chunked", "close", "204", "304")
REPLAY_LIMIT = 65536  # a smaller limit, so that streamed (unbuffered) bodies are covered


@dataclass
class Case:
    number: int
    method: str
    headers: list[tuple[str, str]]
    body: bytes
    chunked_request: bool
    kind: str
    status: int
    reason: str
    response_headers: list[tuple[str, str]]
    response_body: bytes


@dataclass
class Seen:
    """What the client got back."""

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass
class Script:
    cases: dict[str, Case] = field(default_factory=dict)


def _casing(rng: random.Random, name: str) -> str:
    return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in name)


def make_case(rng: random.Random, number: int) -> Case:
    method = rng.choice(METHODS)
    headers = [("Host", "api.test")]
    optional = [
        ("Accept", "application/json"),
        ("User-Agent", "diff/1.0"),
        ("Content-Type", "application/octet-stream"),
        ("Cache-Control", "no-cache"),
        ("X-Request-Id", f"req-{number}"),
        ("x-lower-case", "v"),
        ("X-Spaces", "a  b   c"),
        ("Authorization", "Bearer the-clients-own"),  # replaced by the route's token
        ("X-Hop", "dropped"),
    ]
    for name, value in optional:
        if rng.random() < 0.5:
            headers.append((_casing(rng, name) if rng.random() < 0.3 else name, value))
    if rng.random() < 0.5:
        headers += [("X-Dup", "one"), ("x-dup", "two"), ("X-DUP", "three")]
    if any(name.lower() == "x-hop" for name, _ in headers):
        headers.append(("Connection", "keep-alive, X-Hop"))
    body = b""
    chunked_request = False
    if method in WITH_BODY and rng.random() < 0.85:
        size = rng.choice((0, 1, 100, 5000, REPLAY_LIMIT + 1, 300_000))
        body = rng.randbytes(size)
        chunked_request = rng.random() < 0.5
    kind = rng.choice(("length", "chunked")) if method == "HEAD" else rng.choice(KINDS)
    status = {"204": 204, "304": 304}.get(kind, rng.choice((200, 201, 400, 404, 500)))
    reason = rng.choice(("OK", "Fine Thanks", "Whatever"))
    response_headers = [("Content-Type", "application/json")]
    if rng.random() < 0.5:
        response_headers += [("Set-Cookie", "a=1"), ("set-cookie", "b=2")]
    if rng.random() < 0.5:
        response_headers.append(("x-UPSTREAM-casing", "kept"))
    if rng.random() < 0.3:
        response_headers.append(("content-language", "en"))
    size = rng.choice((0, 10, 4000, 200_000))
    response_body = rng.randbytes(size) if kind not in ("204", "304") else b""
    return Case(
        number,
        method,
        headers,
        body,
        chunked_request,
        kind,
        status,
        reason,
        response_headers,
        response_body,
    )


def answer(case: Case, method: str) -> Answer:
    """The upstream's bytes for a case; HEAD gets the head it would get for GET."""
    lines = [f"HTTP/1.1 {case.status} {case.reason}"]
    lines += [f"{k}: {v}" for k, v in case.response_headers]
    body = case.response_body
    close = False
    if case.kind == "length":
        lines.append(f"Content-Length: {len(body)}")
    elif case.kind == "chunked":
        lines.append("Transfer-Encoding: chunked")
        if body:
            body = b"%x\r\n%s\r\n" % (len(body), body)
        body += b"0\r\n\r\n"
    elif case.kind == "close":
        lines.append("Connection: close")
        close = True
    elif case.kind == "304":
        lines.append("Content-Length: 1234")  # the length a 200 would have had
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    if method == "HEAD" or case.kind in ("204", "304"):
        body = b""
    return Answer(head + body, close=close)


async def send(port: int, case: Case) -> Seen:
    """The case's request over a new connection, with h11 on the client side."""
    client = h11.Connection(h11.CLIENT)
    headers = list(case.headers)
    if (case.method in WITH_BODY and case.body) or case.chunked_request:
        if case.chunked_request:
            headers.append(("Transfer-Encoding", "chunked"))
        else:
            headers.append(("Content-Length", str(len(case.body))))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        data = client.send(
            h11.Request(method=case.method, target=f"/d/{case.number}", headers=headers)
        )
        if case.body:
            pieces = [case.body[i : i + 70_000] for i in range(0, len(case.body), 70_000)]
            for piece in pieces:
                data += client.send(h11.Data(data=piece)) or b""
        data += client.send(h11.EndOfMessage()) or b""
        writer.write(data or b"")
        await writer.drain()
        response: h11.Response | None = None
        body = bytearray()
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await asyncio.wait_for(reader.read(65536), 10))
                continue
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        assert response is not None
        return Seen(
            response.status_code, response.reason, list(response.headers.raw_items()), bytes(body)
        )
    finally:
        writer.close()


def normalize_response(seen: Seen) -> Seen:
    """The justified differences between the two clients, taken out before comparing:

    - ``Date`` is the second the proxy answered: not part of the comparison.
    - Header-name case of well-known fields: aiohttp's response parser replaces the
      name of a field it knows (``content-type`` becomes ``Content-Type``, via its
      ``find_header`` table); the lean client keeps names exactly as the upstream sent
      them (HTTP names are case-insensitive, so both are correct; lean changes less).
      Names are compared lower-cased, values and order exactly.
    """
    headers = [(k.lower(), v) for k, v in seen.headers if k.lower() != b"date"]
    return Seen(seen.status, seen.reason, headers, seen.body)


def request_view(received: Received) -> tuple[str, str, list[tuple[bytes, bytes]], bytes]:
    return received.method, received.target, received.headers, received.body


def as_aiohttp_sends(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """What aiohttp's client makes of request headers the lean client sends as they are.

    ``ClientSession._prepare_headers`` remembers the names it added in a plain,
    case-sensitive set and assigns a name it has not seen with ``result[key] =
    value``, which in the case-insensitive multidict *replaces* the earlier fields
    spelled otherwise: ``X-Dup: one``, ``x-dup: two``, ``X-DUP: three`` reach the
    upstream as ``X-DUP: three`` alone (where ``X-Dup`` stood). The lean client sends
    all three, as the client did: dropping fields is a defect of aiohttp's path
    (RFC 9110 §5.3 lets a recipient combine field lines, never discard them).
    """
    out: list[tuple[bytes, bytes]] = []
    seen: set[bytes] = set()
    for name, value in headers:
        if name in seen:
            out.append((name, value))
            continue
        seen.add(name)
        same = [i for i, (k, _) in enumerate(out) if k.lower() == name.lower()]
        if same:
            out[same[0]] = (name, value)
            out = [field for i, field in enumerate(out) if i not in same[1:]]
        else:
            out.append((name, value))
    return out


@asynccontextmanager
async def two_proxies(up: Peer) -> AsyncIterator[tuple[RunningProxy, RunningProxy]]:
    async def idp(_request: web.Request) -> web.Response:
        return token_answer()

    async with fake_server(idp) as token_server:

        def routes(client: str) -> str:
            return f"""
proxy:
  upstream_client: {client}
  replay_body_limit_bytes: {REPLAY_LIMIT}
clients:
  svc:
    token_url: {token_server.url}/token
    client_id: svc
    client_secret: ${{SENTINEL_SECRET}}
routes:
  - host: api.test
    client: svc
    upstream: {up.url}
"""

        async with running_proxy(routes("lean")) as lean, running_proxy(routes("aiohttp")) as ref:
            yield lean, ref


async def test_lean_and_aiohttp_clients_send_and_return_the_same_bytes() -> None:
    rng = random.Random(SEED)  # noqa: S311 - a reproducible sequence, not a secret
    cases = [make_case(rng, n) for n in range(CASES)]
    by_target = {f"/d/{case.number}": case for case in cases}

    def respond(received: Received) -> Answer:
        return answer(by_target[received.target], received.method)

    mismatches: list[str] = []
    async with peer(respond) as up, two_proxies(up) as (lean, ref):
        assert lean.server.runtime.config.proxy.upstream_client == "lean"
        assert ref.server.runtime.config.proxy.upstream_client == "aiohttp"
        for case in cases:
            seen_lean = await send(lean.server.proxy_port, case)
            got_lean = request_view(up.received[-1])
            seen_ref = await send(ref.server.proxy_port, case)
            got_ref = request_view(up.received[-1])
            method, target, headers, body = got_lean
            if (method, target, as_aiohttp_sends(headers), body) != got_ref:
                mismatches.append(
                    f"case {case.number} request: lean {got_lean[:3]} aiohttp {got_ref[:3]}"
                )
            if normalize_response(seen_lean) != normalize_response(seen_ref):
                mismatches.append(
                    f"case {case.number} ({case.method} {case.kind}) response: "
                    f"lean {normalize_response(seen_lean)} aiohttp {normalize_response(seen_ref)}"[
                        :2000
                    ]
                )
            assert seen_lean.status == case.status, case
            for name, value in case.response_headers:  # names as the upstream spelled them
                assert (name.encode(), value.encode()) in seen_lean.headers, case.number
            expected = (
                b"" if case.method == "HEAD" or case.kind in ("204", "304") else case.response_body
            )
            assert seen_lean.body == expected, case.number
        assert len(up.received) == 2 * CASES  # nothing retried, nothing lost
    assert not mismatches, "\n".join(mismatches)
