"""CONNECT end to end: TLS interception with leaves minted from a local CA, blind
tunnels, transparent TLS and the refusals, with real clients (curl, requests, httpx,
aiohttp, raw ssl sockets), a TLS upstream whose certificate comes from trustme, and
tokens from the real dev IdP. Every key and certificate is generated at test time."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any

import aiohttp
import httpx
import pytest
import requests
import trustme
from aiohttp import web
from dev_stack import DevStack

from m2m_proxy.config import ConfigError, parse_config
from m2m_proxy.interception_ca import CAFiles, init_ca
from tests.functional.conftest import RESOURCE
from tests.functional.support import (
    SENTINEL_SECRET,
    free_port,
    proxy_process,
    run_cli,
    running_proxy,
)
from tests.pki import CertFiles, issue, write_ca

HOST = "api.secure.test"
BIG_BYTES = 32 * 1024 * 1024
CHUNK = 256 * 1024
LOG_WAIT_S = 5.0

Events = Callable[[str], list[dict[str, Any]]]
"""Parsed proxy log lines of one event name."""


# -- PKI ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    upstream_ca: Path
    """The trustme CA that signed the upstream's certificate (for 127.0.0.1)."""
    upstream: CertFiles
    interception: CAFiles
    """ca.pem / ca-key.pem made by ``init_ca``: the CA the proxy mints leaves from."""

    def trusting_interception(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.interception.cert_file))

    def trusting_upstream(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.upstream_ca))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("https-pki")
    ca = trustme.CA()
    return Pki(
        upstream_ca=write_ca(ca, directory / "upstream-ca.pem"),
        upstream=issue(ca, directory, "upstream", "127.0.0.1"),
        interception=init_ca(directory / "interception"),
    )


@cache
def _big_body() -> bytes:
    return os.urandom(BIG_BYTES)


# -- the TLS upstream -----------------------------------------------------------------------


@dataclass
class Recorded:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes

    def authorizations(self) -> list[str]:
        return [v for k, v in self.headers if k.lower() == "authorization"]

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class Upstream:
    port: int = 0
    requests: list[Recorded] = field(default_factory=list)
    connections: int = 0
    """TCP connections accepted (counted before any TLS or HTTP)."""

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"https://{self.authority}"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _echo(request: web.Request) -> web.StreamResponse:
    if request.path == "/big":
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        blob = _big_body()
        for start in range(0, len(blob), CHUNK):
            await response.write(blob[start : start + CHUNK])
        await response.write_eof()
        return response
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path": request.raw_path,
            "len": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
        }
    )


@asynccontextmanager
async def tls_upstream(pki: Pki, handler: Handler = _echo) -> AsyncIterator[Upstream]:
    """An aiohttp server on 127.0.0.1 over TLS (trustme certificate for 127.0.0.1),
    recording every request and counting every accepted TCP connection."""
    state = Upstream()

    async def recording(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        state.requests.append(
            Recorded(request.method, request.raw_path, list(request.headers.items()), body)
        )
        return await handler(request)

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.upstream.cert, pki.upstream.key)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", recording)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    server = runner.server
    assert server is not None

    def counting() -> asyncio.BaseProtocol:
        state.connections += 1
        return server()

    listener = await asyncio.get_running_loop().create_server(counting, "127.0.0.1", 0, ssl=context)
    state.port = int(listener.sockets[0].getsockname()[1])
    try:
        yield state
    finally:
        listener.close()
        await runner.cleanup()
        await listener.wait_closed()


# -- routes ---------------------------------------------------------------------------------


def _routes(
    stack: DevStack,
    pki: Pki,
    upstream: Upstream,
    *,
    unmatched: str = "deny",
    proxy_extra: str = "",
    routes_extra: str = "",
    with_ca: bool = True,
) -> str:
    ca = (
        f"  ca_cert_file: {pki.interception.cert_file}\n"
        f"  ca_key_file: {pki.interception.key_file}\n"
        if with_ca
        else ""
    )
    return f"""
proxy:
  unmatched: {unmatched}
  log_level: debug
{ca}{proxy_extra}
clients:
  basic:
    token_url: {stack.token_url}
    client_id: svc-basic
    client_secret: ${{SENTINEL_SECRET}}
routes:
  - host: {HOST}
    client: basic
    scope: read write
    resource: {RESOURCE}
    upstream: {upstream.url}
    ca_file: {pki.upstream_ca}
{routes_extra}
"""


def _claims_of_the_one_bearer(record: Recorded) -> dict[str, Any]:
    """Exactly one Authorization header, a Bearer JWT from the dev IdP for svc-basic."""
    [value] = record.authorizations()
    scheme, _, token = value.partition(" ")
    assert scheme == "Bearer"
    header, payload, signature = token.split(".")
    assert header and signature
    padded = payload + "=" * (-len(payload) % 4)
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(padded))
    assert claims["client_id"] == "svc-basic"
    assert claims["aud"] == RESOURCE
    return claims


async def _wait_events(events: Events, event: str, count: int = 1) -> list[dict[str, Any]]:
    """The proxy's ``event`` lines once there are at least ``count`` of them."""
    deadline = time.monotonic() + LOG_WAIT_S
    while True:
        found = events(event)
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} {event} log line(s) expected, found {found}")
        await asyncio.sleep(0.02)


def _file_events(path: Path) -> Events:
    def events(event: str) -> list[dict[str, Any]]:
        found = []
        for line in path.read_text().splitlines():
            if line.startswith("{"):
                parsed = json.loads(line)
                if parsed.get("event") == event:
                    found.append(parsed)
        return found

    return events


# -- blocking raw clients (run in a thread) ---------------------------------------------------


Response = tuple[int, dict[str, str], bytes]


def _read_response(stream: IO[bytes]) -> Response:
    status_line = stream.readline()
    if not status_line:
        raise ConnectionError("the connection closed before a response")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := stream.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = stream.read(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while size := int(stream.readline().split(b";")[0], 16):
            body += stream.read(size)
            stream.readline()
        stream.readline()
    else:
        body = stream.read()
    return status, headers, body


def _raw_request(port: int, data: bytes) -> Response:
    """Send ``data`` to the proxy on a fresh connection and read one response."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        with sock.makefile("rb") as stream:
            return _read_response(stream)


def _open_connect(port: int, authority: str) -> socket.socket:
    """A socket to the proxy on which ``CONNECT authority`` was answered 200."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):  # byte by byte: nothing after the head is read
        byte = sock.recv(1)
        if not byte:
            sock.close()
            raise ConnectionError(f"closed after {head!r}")
        head += byte
    if not head.startswith(b"HTTP/1.1 200 "):
        sock.close()
        raise AssertionError(f"CONNECT {authority} answered {head!r}")
    return sock


def _tls_exchange(
    sock: socket.socket, context: ssl.SSLContext, server_hostname: str, request: bytes
) -> Response:
    with context.wrap_socket(sock, server_hostname=server_hostname) as tls:
        tls.sendall(request)
        with tls.makefile("rb") as stream:
            return _read_response(stream)


def _through_connect(
    port: int, authority: str, context: ssl.SSLContext, server_hostname: str, request: bytes
) -> Response:
    return _tls_exchange(_open_connect(port, authority), context, server_hostname, request)


def _direct_tls(
    port: int, context: ssl.SSLContext, server_hostname: str, request: bytes
) -> Response:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return _tls_exchange(sock, context, server_hostname, request)


def _problem(body: bytes) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(body)
    return parsed


# -- curl and aiohttp helpers -----------------------------------------------------------------


async def _curl(
    url: str, *, proxy_url: str, cacert: Path, via_env: bool = False, extra: tuple[str, ...] = ()
) -> tuple[str, str, dict[str, Any]]:
    """curl through the proxy (``-x`` or ``HTTPS_PROXY``): (CONNECT status, status, JSON)."""
    env = {"NO_PROXY": "", "no_proxy": "", "HTTPS_PROXY": "", "https_proxy": ""}
    argv = ["curl", "-sS", "--fail-with-body", "--cacert", str(cacert)]
    argv += ["-w", "\n%{http_connect} %{http_code}", *extra]
    if via_env:
        env |= {"HTTPS_PROXY": proxy_url, "https_proxy": proxy_url}
    else:
        argv += ["-x", proxy_url]
    code, out, err = await run_cli(*argv, url, env=env)
    assert code == 0, err
    body, _, statuses = out.rpartition("\n")
    connect_status, status = statuses.split(" ")
    parsed: dict[str, Any] = json.loads(body)
    return connect_status, status, parsed


def _connection_counter() -> tuple[aiohttp.TraceConfig, list[int]]:
    """A trace config counting the connections an aiohttp session opens."""
    created: list[int] = []

    async def on_created(
        _session: aiohttp.ClientSession,
        _ctx: SimpleNamespace,
        _params: aiohttp.TraceConnectionCreateEndParams,
    ) -> None:
        created.append(1)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_created)
    return trace, created


async def _keep_alive_session_checks(
    proxy_url: str, pki: Pki, upstream: Upstream, events: Events
) -> None:
    """Several GETs and a POST in one session: one CONNECT, one tunnel, one token each."""
    trace, created = _connection_counter()
    context = pki.trusting_interception()
    payload = os.urandom(300 * 1024)
    async with aiohttp.ClientSession(trust_env=False, trace_configs=[trace]) as client:
        for i in range(4):
            async with client.get(
                f"https://{HOST}/keep/{i}?q={i}", proxy=proxy_url, ssl=context
            ) as resp:
                assert resp.status == 200
                assert (await resp.json())["path"] == f"/keep/{i}?q={i}"
        async with client.post(
            f"https://{HOST}/post", data=payload, proxy=proxy_url, ssl=context
        ) as resp:
            assert resp.status == 200
            echoed = await resp.json()
    assert echoed == {
        "method": "POST",
        "path": "/post",
        "len": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    assert len(created) == 1
    [opened] = await _wait_events(events, "tunnel_opened")
    assert opened["mode"] == "intercept"
    assert opened["route"] == HOST
    completed = await _wait_events(events, "request_completed", 5)
    assert [(e["method"], e["status"], e["route"]) for e in completed] == [
        *[("GET", 200, HOST)] * 4,
        ("POST", 200, HOST),
    ]
    assert [r.path for r in upstream.requests] == [
        *[f"/keep/{i}?q={i}" for i in range(4)],
        "/post",
    ]
    assert upstream.requests[-1].body == payload
    tokens = {_claims_of_the_one_bearer(r)["jti"] for r in upstream.requests}
    assert len(tokens) == 1


# -- 1. curl ----------------------------------------------------------------------------------


@pytest.mark.parametrize("via_env", [False, True], ids=["curl-x", "HTTPS_PROXY-env"])
async def test_curl_through_connect_gets_the_token_added(
    stack: DevStack, pki: Pki, via_env: bool
) -> None:
    async with tls_upstream(pki) as upstream:
        async with running_proxy(_routes(stack, pki, upstream)) as proxy:
            connect_status, status, body = await _curl(
                f"https://{HOST}/curl/path?a=1&b=%2F",
                proxy_url=proxy.url,
                cacert=pki.interception.cert_file,
                via_env=via_env,
            )
            [completed] = await _wait_events(proxy.log_events, "request_completed")
            [opened] = proxy.log_events("tunnel_opened")
    assert (connect_status, status) == ("200", "200")
    assert body["path"] == "/curl/path?a=1&b=%2F"
    [received] = upstream.requests
    assert received.path == "/curl/path?a=1&b=%2F"
    assert received.header("Host") == [upstream.authority]
    claims = _claims_of_the_one_bearer(received)
    assert set(claims["scope"].split()) == {"read", "write"}
    assert completed["route"] == HOST
    assert completed["status"] == 200
    assert completed["token_cache"] == "miss"
    assert opened["mode"] == "intercept"
    assert len(stack.token_requests()) == 1


# -- 2. requests and httpx ---------------------------------------------------------------------


async def test_requests_and_httpx_through_connect(stack: DevStack, pki: Pki) -> None:
    ca_file = str(pki.interception.cert_file)
    async with tls_upstream(pki) as upstream:
        async with running_proxy(_routes(stack, pki, upstream)) as proxy:

            def with_requests() -> tuple[int, dict[str, Any]]:
                with requests.Session() as session:
                    session.trust_env = False
                    resp = session.post(
                        f"https://{HOST}/requests",
                        data=b"payload",
                        proxies={"https": proxy.url},
                        verify=ca_file,
                        timeout=10,
                    )
                    return resp.status_code, resp.json()

            def with_httpx() -> tuple[int, dict[str, Any]]:
                context = pki.trusting_interception()
                with httpx.Client(
                    proxy=proxy.url, verify=context, trust_env=False, timeout=10
                ) as client:
                    resp = client.get(f"https://{HOST}/httpx")
                    return resp.status_code, resp.json()

            via_requests = await asyncio.to_thread(with_requests)
            via_httpx = await asyncio.to_thread(with_httpx)
            # httpx as a service would run it: HTTPS_PROXY and SSL_CERT_FILE from the env.
            script = (
                "import httpx, sys; r = httpx.get(sys.argv[1], timeout=10); "
                "print(r.status_code, r.text)"
            )
            code, out, err = await run_cli(
                sys.executable,
                "-c",
                script,
                f"https://{HOST}/httpx-env",
                env={
                    "HTTPS_PROXY": proxy.url,
                    "NO_PROXY": "",
                    "no_proxy": "",
                    "SSL_CERT_FILE": ca_file,
                },
            )
            opened = await _wait_events(proxy.log_events, "tunnel_opened", 3)
    assert via_requests[0] == 200
    assert via_requests[1]["sha256"] == hashlib.sha256(b"payload").hexdigest()
    assert via_httpx == (200, {"method": "GET", "path": "/httpx", **_empty_body()})
    assert code == 0, err
    status, _, text = out.strip().partition(" ")
    assert status == "200"
    assert json.loads(text)["path"] == "/httpx-env"
    assert [r.path for r in upstream.requests] == ["/requests", "/httpx", "/httpx-env"]
    assert upstream.requests[0].body == b"payload"
    for record in upstream.requests:
        _claims_of_the_one_bearer(record)
    assert len(opened) == 3
    assert len(stack.token_requests()) == 1  # one cached token for all three tunnels


def _empty_body() -> dict[str, Any]:
    return {"len": 0, "sha256": hashlib.sha256(b"").hexdigest()}


# -- 3. aiohttp: keep-alive, bodies, a large stream, 401 replay ----------------------------------


async def test_aiohttp_keeps_one_tunnel_for_several_requests(stack: DevStack, pki: Pki) -> None:
    async with tls_upstream(pki) as upstream:
        async with running_proxy(_routes(stack, pki, upstream)) as proxy:
            await _keep_alive_session_checks(proxy.url, pki, upstream, proxy.log_events)
    assert len(stack.token_requests()) == 1


async def test_large_streamed_response_arrives_whole(stack: DevStack, pki: Pki) -> None:
    expected = hashlib.sha256(_big_body()).hexdigest()
    async with tls_upstream(pki) as upstream:
        async with running_proxy(_routes(stack, pki, upstream)) as proxy:
            async with aiohttp.ClientSession(trust_env=False) as client:
                async with client.get(
                    f"https://{HOST}/big",
                    proxy=proxy.url,
                    ssl=pki.trusting_interception(),
                    timeout=aiohttp.ClientTimeout(total=45),
                ) as resp:
                    assert resp.status == 200
                    digest = hashlib.sha256()
                    received = 0
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        digest.update(chunk)
                        received += len(chunk)
    assert received == BIG_BYTES
    assert digest.hexdigest() == expected
    _claims_of_the_one_bearer(upstream.requests[0])


async def test_401_is_recovered_by_a_new_token_and_a_replay(stack: DevStack, pki: Pki) -> None:
    first_token: list[str] = []

    async def rejects_the_first_token(request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        if not first_token:
            first_token.append(auth)
        if auth == first_token[0]:
            return web.json_response(
                {"error": "invalid_token"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return await _echo(request)

    async with tls_upstream(pki, rejects_the_first_token) as upstream:
        async with running_proxy(_routes(stack, pki, upstream)) as proxy:
            async with aiohttp.ClientSession(trust_env=False) as client:
                async with client.post(
                    f"https://{HOST}/replayed",
                    data=b"replay-me",
                    proxy=proxy.url,
                    ssl=pki.trusting_interception(),
                ) as resp:
                    status = resp.status
                    echoed = await resp.json()
            [completed] = await _wait_events(proxy.log_events, "request_completed")
    assert status == 200
    assert echoed["sha256"] == hashlib.sha256(b"replay-me").hexdigest()
    assert completed["retried"] == "recovered"
    assert completed["status"] == 200
    first, second = upstream.requests
    assert first.body == second.body == b"replay-me"
    assert _claims_of_the_one_bearer(first)["jti"] != _claims_of_the_one_bearer(second)["jti"]
    assert len(stack.token_requests()) == 2


# -- 4. refusals ---------------------------------------------------------------------------------


async def test_unrouted_connect_is_denied_before_any_upstream_connection(
    stack: DevStack, pki: Pki
) -> None:
    async with tls_upstream(pki) as upstream:
        async with running_proxy(_routes(stack, pki, upstream)) as proxy:
            port = proxy.server.proxy_port
            for authority in (upstream.authority, "unrouted.secure.test:443"):
                request = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
                status, headers, body = await asyncio.to_thread(
                    _raw_request, port, request.encode()
                )
                assert status == 403, authority
                assert headers["connection"] == "close"
                assert headers["content-type"] == "application/problem+json"
                assert _problem(body)["code"] == "route_denied"
            refused = proxy.log_events("connect_refused")
    assert upstream.connections == 0
    assert [(e["status"], e["code"]) for e in refused] == [(403, "route_denied")] * 2
    assert stack.token_requests() == []


async def test_connect_to_a_port_outside_connect_ports_is_denied(stack: DevStack, pki: Pki) -> None:
    async with tls_upstream(pki) as upstream:
        routes = _routes(stack, pki, upstream, unmatched="passthrough")
        async with running_proxy(routes) as proxy:
            request = f"CONNECT {upstream.authority} HTTP/1.1\r\nHost: {upstream.authority}\r\n\r\n"
            status, _, body = await asyncio.to_thread(
                _raw_request, proxy.server.proxy_port, request.encode()
            )
    assert status == 403
    problem = _problem(body)
    assert problem["code"] == "route_denied"
    assert f"port {upstream.port}" in problem["detail"]
    assert "connect_ports" in problem["detail"]
    assert upstream.connections == 0


async def test_malformed_connect_authority_is_400(stack: DevStack, pki: Pki) -> None:
    cases = [
        b"CONNECT nope HTTP/1.1\r\nHost: nope\r\n\r\n",
        b"CONNECT a@b:443 HTTP/1.1\r\nHost: b:443\r\n\r\n",
        b"CONNECT api.secure.test:99999 HTTP/1.1\r\n\r\n",
        b"CONNECT https://api.secure.test:443/ HTTP/1.1\r\n\r\n",
        b"CONNECT api.secure.test:443 HTTP/9.9\r\n\r\n",
    ]
    async with tls_upstream(pki) as upstream:
        async with running_proxy(_routes(stack, pki, upstream)) as proxy:
            for request in cases:
                status, headers, body = await asyncio.to_thread(
                    _raw_request, proxy.server.proxy_port, request
                )
                assert status == 400, request
                assert headers["connection"] == "close"
                assert _problem(body)["code"] == "bad_request", request
    assert upstream.connections == 0
    assert stack.token_requests() == []


async def test_tunnel_requests_for_another_host_get_421_and_no_token(
    stack: DevStack, pki: Pki
) -> None:
    """SNI, Host or an absolute target naming another host than the CONNECT: 421."""
    # The leaf names the CONNECT host, so a client sending another SNI must skip the
    # name check to get as far as sending a request; the chain is still verified.
    lax = pki.trusting_interception()
    lax.check_hostname = False
    strict = pki.trusting_interception()
    connect = f"{HOST}:443"
    good = f"GET /x HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    cases = [
        ("SNI", lax, "other.secure.test", good),
        ("Host", strict, HOST, b"GET /x HTTP/1.1\r\nHost: other.secure.test\r\n\r\n"),
        ("Host port", strict, HOST, f"GET /x HTTP/1.1\r\nHost: {HOST}:8443\r\n\r\n".encode()),
        (
            "absolute",
            strict,
            HOST,
            f"GET https://other.secure.test/x HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode(),
        ),
        (
            "http scheme",
            strict,
            HOST,
            f"GET http://{HOST}/x HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode(),
        ),
    ]
    async with tls_upstream(pki) as upstream:
        async with running_proxy(_routes(stack, pki, upstream)) as proxy:
            port = proxy.server.proxy_port
            for name, context, sni, request in cases:
                status, _, body = await asyncio.to_thread(
                    _through_connect, port, connect, context, sni, request
                )
                assert status == 421, name
                assert _problem(body)["status"] == 421, name
            assert upstream.connections == 0
            assert upstream.requests == []
            assert stack.token_requests() == []
            # The same harness with matching names does reach the upstream.
            status, _, _ = await asyncio.to_thread(
                _through_connect, port, connect, strict, HOST, good
            )
    assert status == 200
    [received] = upstream.requests
    _claims_of_the_one_bearer(received)


async def test_client_not_trusting_the_ca_fails_the_handshake_and_the_proxy_goes_on(
    stack: DevStack, pki: Pki
) -> None:
    async with tls_upstream(pki) as upstream:
        async with running_proxy(_routes(stack, pki, upstream)) as proxy:
            # curl checks against the system store, which lacks the interception CA.
            code, _, _ = await run_cli(
                "curl", "-sS", "-x", proxy.url, f"https://{HOST}/untrusted-curl"
            )
            [by_curl] = await _wait_events(proxy.log_events, "tls_intercept_failed")
            async with aiohttp.ClientSession(trust_env=False) as client:
                with pytest.raises(aiohttp.ClientConnectorCertificateError):
                    await client.get(
                        f"https://{HOST}/untrusted",
                        proxy=proxy.url,
                        ssl=ssl.create_default_context(),  # the system store only
                    )
            by_aiohttp = (await _wait_events(proxy.log_events, "tls_intercept_failed", 2))[1]
            assert upstream.requests == []
            _, status, _ = await _curl(
                f"https://{HOST}/after", proxy_url=proxy.url, cacert=pki.interception.cert_file
            )
            opened = proxy.log_events("tunnel_opened")
    assert code == 60  # curl: the peer certificate cannot be authenticated
    # curl sends the unknown_ca alert; asyncio's client just drops the connection.
    assert (by_curl["route"], by_curl["reason"]) == (HOST, "TLSV1_ALERT_UNKNOWN_CA")
    assert by_aiohttp["route"] == HOST
    assert by_aiohttp["reason"]
    assert status == "200"
    assert len(opened) == 1
    assert [r.path for r in upstream.requests] == ["/after"]


async def test_intercept_without_a_ca(stack: DevStack, pki: Pki) -> None:
    """Explicit ``https: intercept`` with no CA is a config error; the default mode with
    no CA refuses CONNECT with 403 naming the fix; ``https: tunnel`` needs no CA."""
    async with tls_upstream(pki) as upstream:
        base = _routes(stack, pki, upstream, with_ca=False)
        env = {"SENTINEL_SECRET": SENTINEL_SECRET}
        with pytest.raises(ConfigError) as raised:
            parse_config(base + "    https: intercept\n", "routes.yaml", env)
        assert "routes[0].https" in str(raised.value)
        assert "ca init" in str(raised.value)
        assert parse_config(base + "    https: tunnel\n", "routes.yaml", env).routes
        async with running_proxy(base) as proxy:
            request = f"CONNECT {HOST}:443 HTTP/1.1\r\n\r\n".encode()
            status, _, body = await asyncio.to_thread(
                _raw_request, proxy.server.proxy_port, request
            )
    assert status == 403
    assert "interception CA" in _problem(body)["detail"]
    assert upstream.connections == 0


# -- 5. blind tunnels ---------------------------------------------------------------------------


async def test_route_with_https_tunnel_relays_blindly(stack: DevStack, pki: Pki) -> None:
    async with tls_upstream(pki) as upstream:
        tunnel_route = f"""  - host: {upstream.authority}
    client: basic
    https: tunnel
"""
        async with running_proxy(_routes(stack, pki, upstream, routes_extra=tunnel_route)) as proxy:
            async with aiohttp.ClientSession(trust_env=False) as client:
                async with client.get(
                    f"{upstream.url}/blind?x=1",
                    proxy=proxy.url,
                    ssl=pki.trusting_upstream(),  # the upstream's own CA: no interception
                    headers={"Authorization": "Bearer the-clients-own"},
                ) as resp:
                    assert resp.status == 200
                    body = await resp.read()
            [closed] = await _wait_events(proxy.log_events, "tunnel_closed")
            [opened] = proxy.log_events("tunnel_opened")
            completed = proxy.log_events("request_completed")
    assert json.loads(body)["path"] == "/blind?x=1"
    [received] = upstream.requests
    assert received.authorizations() == ["Bearer the-clients-own"]
    assert received.header("Via") == []  # the proxy never saw the HTTP inside
    assert (opened["mode"], opened["route"]) == ("tunnel", upstream.authority)
    assert (closed["mode"], closed["route"]) == ("tunnel", upstream.authority)
    assert closed["closed_by"] in ("client", "upstream")
    assert closed["bytes_up"] > 0
    assert closed["bytes_down"] > len(body)
    assert completed == []
    assert stack.token_requests() == []


async def test_passthrough_tunnels_unrouted_hosts_on_allowed_ports(
    stack: DevStack, pki: Pki
) -> None:
    async with tls_upstream(pki) as upstream:
        routes = _routes(
            stack,
            pki,
            upstream,
            unmatched="passthrough",
            # the test upstream is on loopback: the egress policy must be told
            proxy_extra=f"  connect_ports: [443, {upstream.port}]\n"
            "  allow_destinations: [127.0.0.1/32]\n",
        )
        async with running_proxy(routes) as proxy:
            connect_status, status, body = await _curl(
                f"{upstream.url}/pass",
                proxy_url=proxy.url,
                cacert=pki.upstream_ca,
                extra=("-H", "Authorization: Bearer the-clients-own"),
            )
            [closed] = await _wait_events(proxy.log_events, "tunnel_closed")
            completed = proxy.log_events("request_completed")
    assert (connect_status, status) == ("200", "200")
    assert body["path"] == "/pass"
    [received] = upstream.requests
    assert received.authorizations() == ["Bearer the-clients-own"]
    assert closed["route"] is None
    assert closed["bytes_up"] > 0
    assert closed["bytes_down"] > 0
    # closed_by is not checked: curl closes without waiting for the upstream's
    # close_notify, and on the asyncio loop the relay then reports "error" (reported).
    assert completed == []
    assert stack.token_requests() == []


# -- 6. transparent TLS ---------------------------------------------------------------------------


async def test_transparent_tls_is_routed_by_sni_and_intercepted(stack: DevStack, pki: Pki) -> None:
    request = f"GET /x HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    async with tls_upstream(pki) as upstream:
        routes = _routes(stack, pki, upstream, proxy_extra="  transparent: true\n")
        async with running_proxy(routes) as proxy:
            port = proxy.server.proxy_port
            context = pki.trusting_interception()
            status, _, body = await asyncio.to_thread(_direct_tls, port, context, HOST, request)
            # An SNI no route names: the connection is closed, nothing is answered.
            with pytest.raises(OSError):
                await asyncio.to_thread(_direct_tls, port, context, "unrouted.secure.test", request)
            [refused] = await _wait_events(proxy.log_events, "transparent_refused")
            # The same listener still serves plain HTTP and CONNECT.
            code, out, err = await run_cli(
                "curl", "-sS", "--fail-with-body", "-x", proxy.url, f"http://{HOST}/plain"
            )
            _, connect_status, _ = await _curl(
                f"https://{HOST}/connect", proxy_url=proxy.url, cacert=pki.interception.cert_file
            )
    assert status == 200
    assert json.loads(body)["path"] == "/x"
    assert refused["sni"] == "unrouted.secure.test"
    assert code == 0, err
    assert json.loads(out)["path"] == "/plain"
    assert connect_status == "200"
    assert [r.path for r in upstream.requests] == ["/x", "/plain", "/connect"]
    for record in upstream.requests:
        _claims_of_the_one_bearer(record)


# -- 7. aiohttp's pure-Python parser, uvloop, a real process -------------------------------------


async def test_connect_with_the_pure_python_parser_in_a_proxy_process(
    stack: DevStack, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIOHTTP_NO_EXTENSIONS", "1")  # proxy_process passes os.environ on
    code, out, err = await run_cli(
        sys.executable,
        "-c",
        "from aiohttp import http_parser as p; print(p.HttpRequestParser is p.HttpRequestParserPy)",
    )
    assert (code, out.strip()) == (0, "True"), err
    port, admin_port = free_port(), free_port()
    log_file = tmp_path / "proxy.log"
    async with tls_upstream(pki) as upstream:
        text = _routes(stack, pki, upstream, proxy_extra="  transparent: true\n").replace(
            "proxy:\n",
            f"proxy:\n  listen: 127.0.0.1:{port}\n  admin_listen: 127.0.0.1:{admin_port}\n",
            1,
        )
        config = tmp_path / "routes.yaml"
        config.write_text(text)
        proxy_url = f"http://127.0.0.1:{port}"
        with log_file.open("wb") as output:
            async with proxy_process(config, admin_port, output=output):
                events = _file_events(log_file)
                await _keep_alive_session_checks(proxy_url, pki, upstream, events)
                _, status, body = await _curl(
                    f"https://{HOST}/curl", proxy_url=proxy_url, cacert=pki.interception.cert_file
                )
                assert (status, body["path"]) == ("200", "/curl")
                context = pki.trusting_interception()
                request = f"GET /transparent HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
                direct, _, _ = await asyncio.to_thread(_direct_tls, port, context, HOST, request)
                assert direct == 200
                misdirected, _, _ = await asyncio.to_thread(
                    _through_connect,
                    port,
                    f"{HOST}:443",
                    context,
                    HOST,
                    b"GET /x HTTP/1.1\r\nHost: other.secure.test\r\n\r\n",
                )
                assert misdirected == 421
                bad, _, _ = await asyncio.to_thread(
                    _raw_request, port, b"CONNECT a@b:443 HTTP/1.1\r\n\r\n"
                )
                assert bad == 400
    assert [r.path for r in upstream.requests][-2:] == ["/curl", "/transparent"]
    for record in upstream.requests:
        _claims_of_the_one_bearer(record)
    assert len(stack.token_requests()) == 1


# -- a WebSocket inside an intercepted tunnel ------------------------------------------------


async def test_a_websocket_inside_an_intercepted_tunnel_gets_the_token(
    stack: DevStack, pki: Pki
) -> None:
    async def ws_echo(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"echo:{msg.data}")
        return ws

    async with tls_upstream(pki, ws_echo) as upstream:
        routes = _routes(stack, pki, upstream, routes_extra="    upgrades: [websocket]\n")
        async with running_proxy(routes) as proxy, aiohttp.ClientSession() as session:
            async with session.ws_connect(
                f"wss://{HOST}/ws", proxy=proxy.url, ssl=pki.trusting_interception()
            ) as ws:
                await ws.send_str("over tls")
                assert (await ws.receive(timeout=5)).data == "echo:over tls"
            [record] = upstream.requests
            _claims_of_the_one_bearer(record)
            assert record.header("Upgrade") == ["websocket"]
            events = await _wait_events(proxy.log_events, "request_completed")
            assert [e["status"] for e in events] == [101]
