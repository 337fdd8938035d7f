"""Header syntax abuse (obs-fold, bare CR/LF, NUL, underscores) and header-rule abuse
(hop-by-hop, Connection-named fields, the client's own Authorization)."""

from __future__ import annotations

import pytest

from tests.security.capture import Answer, CapturedRequest
from tests.security.rig import API, BEARER, Rig, each_upstream_client, running_rig


def get(headers: str, *, target: str = f"http://{API}/p") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: {API}\r\n{headers}\r\n".encode("latin-1")


MALFORMED = {
    "obs-fold continuation": get("X-A: one\r\n two\r\n"),
    "obs-fold with tab": get("X-A: one\r\n\ttwo\r\n"),
    "obs-fold of Authorization": get("X-A: one\r\n Authorization: Bearer client-own\r\n"),
    "line starting with whitespace first": (
        f"GET http://{API}/p HTTP/1.1\r\n Host: {API}\r\nHost: {API}\r\n\r\n".encode()
    ),
    "bare CR inside a value": get("X-A: a\rb\r\n"),
    "bare CR ending a header": get("X-A: a\rX-B: b\r\n"),
    "bare LF ending a header": get("X-A: a\nX-B: b\r\n"),
    "bare LF everywhere": f"GET http://{API}/p HTTP/1.1\nHost: {API}\nX-A: a\n\n".encode(),
    "NUL in a value": get("X-A: a\x00b\r\n"),
    "NUL in a name": get("X\x00A: ab\r\n"),
    "control character in a value": get("X-A: a\x01b\x7fc\r\n"),
    "non-ASCII in a name": get("X-\xe9: v\r\n"),
    "space before colon": get("Authorization : Bearer client-own\r\n"),
    "no colon": get("Authorization Bearer client-own\r\n"),
    "empty name": get(": v\r\n"),
    "two Host headers": (
        f"GET /p HTTP/1.1\r\nHost: {API}\r\nHost: other.example.com\r\n\r\n".encode()
    ),
}


@pytest.mark.parametrize("data", [pytest.param(v, id=k) for k, v in MALFORMED.items()])
async def test_malformed_header_section_is_refused(rig: Rig, data: bytes) -> None:
    await rig.refused(data, 400, closes=True, code="bad_request", not_echoed=b"client-own")


@pytest.mark.parametrize("client", each_upstream_client())
@pytest.mark.parametrize("value", [b"adm\x80in", b"caf\xe9", b"\xff\xfe"])
async def test_obs_text_in_a_value_is_refused_or_forwarded_unchanged(
    client: str, value: bytes
) -> None:
    """'X-Role: adm\\x80in' must not become 'X-Role: admin' on the way (it did with the
    aiohttp ClientSession at b8a28d8: non-UTF-8 bytes were deleted)."""
    async with running_rig(upstream_client=client) as rig:
        reply = await rig.send(get("")[:-2] + b"X-Role: " + value + b"\r\n\r\n")
        assert reply.error is None
        if reply.statuses == [400]:
            assert rig.requests == []
        else:
            assert reply.statuses == [200]
            [request] = rig.a.requests
            assert request.header("X-Role") == [value]
        rig.assert_upstream_clean()


async def test_header_names_with_underscores_are_not_forwarded(rig: Rig) -> None:
    """X_Forwarded_For and X-Forwarded-For are one variable (HTTP_X_FORWARDED_FOR) to a
    CGI-style upstream: the proxy drops the underscore spelling, keeps the other."""
    request = await rig.forwarded(
        get(
            "X_Forwarded_For: 10.0.0.1\r\nX-Forwarded-For: 192.0.2.1\r\n"
            "X_Authorization: Bearer client-own\r\nAuthorization_: Bearer client-own\r\n"
        ),
        also_absent=("X_Forwarded_For", "X_Authorization", "Authorization_"),
    )
    assert request.header("X-Forwarded-For") == [b"192.0.2.1"]
    assert b"client-own" not in request_bytes(rig)


def request_bytes(rig: Rig) -> bytes:
    return b"".join(bytes(c.raw) for u in rig.upstreams for c in u.connections)


async def test_connection_authorization_cannot_strip_the_token_nor_pass_the_clients(
    rig: Rig,
) -> None:
    request = await rig.forwarded(
        get("Connection: keep-alive, Authorization\r\nAuthorization: Bearer client-own\r\n")
    )
    assert request.header("Authorization") == [BEARER]
    assert b"client-own" not in request_bytes(rig)


async def test_connection_close_strips_the_fields_it_names(rig: Rig) -> None:
    reply = await rig.send(
        get("Connection: close, X-Secret\r\nX-Secret: do-not-forward\r\nX-Kept: yes\r\n")
    )
    assert reply.statuses == [200]
    assert reply.closed
    [request] = rig.a.requests
    assert request.header("X-Secret") == []
    assert request.header("X-Kept") == [b"yes"]
    assert b"do-not-forward" not in request_bytes(rig)
    rig.assert_upstream_clean()
    await rig.assert_still_serves()


async def test_connection_tokens_in_any_case_and_spacing_strip_their_fields(rig: Rig) -> None:
    request = await rig.forwarded(
        get(
            "Connection: x-one ,\tX-TWO,, x-Three\r\nConnection: X-Four\r\n"
            "X-One: 1\r\nx-two: 2\r\nX-THREE: 3\r\nX-Four: 4\r\nX-Five: 5\r\n"
        ),
        also_absent=("X-One", "X-Two", "X-Three", "X-Four"),
    )
    assert request.header("X-Five") == [b"5"]


async def test_connection_naming_host_via_or_content_length_does_not_break_framing(
    rig: Rig,
) -> None:
    data = (
        f"POST http://{API}/p HTTP/1.1\r\nHost: {API}\r\n"
        "Connection: Host, Via, Content-Length, Transfer-Encoding\r\n"
        "Content-Length: 5\r\n\r\nhello"
    ).encode()
    request = await rig.forwarded(data, body=b"hello")
    assert request.header("Host") == [f"127.0.0.1:{rig.a.port}".encode()]


async def test_every_hop_by_hop_field_is_removed(rig: Rig) -> None:
    await rig.forwarded(
        get(
            "Keep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X-Checksum\r\n"
            "Upgrade: websocket\r\nProxy-Connection: keep-alive\r\n"
            "Proxy-Authorization: Basic dXNlcjpwYXNz\r\nProxy-Foo: bar\r\n"
            "Expect: 100-continue\r\n"
        ),
        also_absent=("Expect",),
    )


async def test_the_clients_authorization_never_reaches_the_upstream(rig: Rig) -> None:
    request = await rig.forwarded(
        get(
            "Authorization: Bearer client-own\r\naUtHoRiZaTiOn: Basic Y2xpZW50Om93bg==\r\n"
            "authorization: Bearer client-own-2\r\n"
        )
    )
    assert request.header("Authorization") == [BEARER]
    assert b"client-own" not in request_bytes(rig)
    assert b"Y2xpZW50Om93bg" not in request_bytes(rig)


async def test_upgrade_requests_are_forwarded_as_plain_requests(rig: Rig) -> None:
    """h2c / websocket upgrades cannot turn the connection into an unmediated tunnel."""
    request = await rig.forwarded(
        get(
            "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
        ),
        also_absent=("HTTP2-Settings",),
    )
    assert request.method == b"GET"


async def test_trace_on_a_route_with_a_token_is_refused(rig: Rig) -> None:
    """TRACE asks the upstream to echo the request back, token included."""

    def echo(request: CapturedRequest) -> Answer:
        return Answer(
            200,
            (("Content-Type", "message/http"),),
            b"".join(k + b": " + v + b"\r\n" for k, v in request.headers),
        )

    rig.a.responder = echo
    reply = await rig.send(f"TRACE http://{API}/p HTTP/1.1\r\nHost: {API}\r\n\r\n".encode())
    assert reply.statuses == [405], reply.raw[:300]
    assert rig.requests == []


async def test_hop_by_hop_and_connection_named_response_fields_are_removed(rig: Rig) -> None:
    rig.a.responder = lambda _request: Answer(
        200,
        (
            ("Connection", "X-Internal, Keep-Alive"),
            ("X-Internal", "upstream-only"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authenticate", "Basic"),
            ("Proxy-Foo", "bar"),
            ("X-End-To-End", "kept"),
        ),
        b"body",
    )
    reply = await rig.send(get(""))
    assert reply.statuses == [200]
    [response] = reply.responses
    names = {k.lower() for k, _ in response.headers}
    assert not names & {b"x-internal", b"keep-alive", b"proxy-authenticate", b"proxy-foo"}
    assert response.header("X-End-To-End") == [b"kept"]
    assert response.body == b"body"


async def test_the_proxy_does_not_advertise_its_software_versions(rig: Rig) -> None:
    refused = await rig.send(b"GARBAGE\r\n\r\n")
    forwarded = await rig.send(get(""))
    for reply in (refused, forwarded):
        for response in reply.responses:
            assert not any(b"aiohttp" in v or b"Python" in v for v in response.header("Server"))
