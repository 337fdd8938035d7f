"""Request smuggling and message framing: CL.TE, TE.CL, TE.TE, Content-Length and chunk
syntax. Every ambiguous message is refused with 400 and the connection closed before
anything reaches an upstream; an unambiguous one is forwarded once, byte for byte,
re-framed by the proxy."""

from __future__ import annotations

import gzip

import pytest

from tests.security.rig import API, Rig

SMUGGLED = f"GET http://{API}/smuggled HTTP/1.1\r\nHost: {API}\r\n\r\n".encode()


def post(headers: str, body: bytes, *, version: str = "1.1") -> bytes:
    """A POST to the routed host with ``headers`` (each line ending in CRLF) and ``body``."""
    head = f"POST http://{API}/p HTTP/{version}\r\nHost: {API}\r\n{headers}\r\n"
    return head.encode("latin-1") + body


CHUNKED_HELLO = b"5\r\nhello\r\n0\r\n\r\n"

# Messages a front end and a back end could frame differently. Each carries a second,
# smuggled request that must never reach the upstream.
AMBIGUOUS = {
    # CL.TE: a CL-framing front end sees 6 bytes of body, a TE one sees "0" and then "G".
    "cl-te": post("Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\nG" + SMUGGLED),
    # TE.CL: the chunk carries the smuggled request for a CL-framing back end.
    "te-cl": post(
        "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
        f"{len(SMUGGLED):x}\r\n".encode() + SMUGGLED + b"\r\n0\r\n\r\n",
    ),
    "te-te chunked, identity": post(
        "Transfer-Encoding: chunked, identity\r\nContent-Length: 5\r\n", CHUNKED_HELLO + SMUGGLED
    ),
    "te-te space before colon": post(
        "Transfer-Encoding : chunked\r\nContent-Length: 5\r\n", CHUNKED_HELLO + SMUGGLED
    ),
    "te-te xchunked": post(
        "Transfer-Encoding: xchunked\r\nContent-Length: 5\r\n", CHUNKED_HELLO + SMUGGLED
    ),
    "te-te tab + content-length": post(
        "Transfer-Encoding:\tchunked\r\nContent-Length: 5\r\n", CHUNKED_HELLO + SMUGGLED
    ),
    "te-te vertical tab": post("Transfer-Encoding:\x0bchunked\r\n", CHUNKED_HELLO + SMUGGLED),
    "te-te form feed": post("Transfer-Encoding:\x0cchunked\r\n", CHUNKED_HELLO + SMUGGLED),
    "te-te duplicate headers": post(
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", CHUNKED_HELLO + SMUGGLED
    ),
    "te-te duplicate chunked": post(
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", CHUNKED_HELLO + SMUGGLED
    ),
    "te-te chunked, chunked": post(
        "Transfer-Encoding: chunked, chunked\r\n", CHUNKED_HELLO + SMUGGLED
    ),
    "te-te quoted": post('Transfer-Encoding: "chunked"\r\n', CHUNKED_HELLO + SMUGGLED),
    "te-te parameter": post("Transfer-Encoding: chunked;q=1\r\n", CHUNKED_HELLO + SMUGGLED),
    "te-te truncated": post("Transfer-Encoding: chunk\r\n", CHUNKED_HELLO + SMUGGLED),
    "te-te NUL": post("Transfer-Encoding: chunked\x00\r\n", CHUNKED_HELLO + SMUGGLED),
    "te identity only": post("Transfer-Encoding: identity\r\n", b"hello" + SMUGGLED),
    "te empty without length": post("Transfer-Encoding: \r\n", b"hello" + SMUGGLED),
    "content-length then empty te": post(
        "Content-Length: 5\r\nTransfer-Encoding: \r\n", b"hello" + SMUGGLED
    ),
    "te obs-fold": post(
        "Transfer-Encoding: identity\r\n chunked\r\nContent-Length: 5\r\n", b"hello" + SMUGGLED
    ),
    "content-length list 5, 6": post("Content-Length: 5, 6\r\n", b"helloX" + SMUGGLED),
    "content-length list 5, 5": post("Content-Length: 5, 5\r\n", b"hello" + SMUGGLED),
    "content-length +5": post("Content-Length: +5\r\n", b"hello" + SMUGGLED),
    "content-length 0x5": post("Content-Length: 0x5\r\n", b"hello" + SMUGGLED),
    "content-length -1": post("Content-Length: -1\r\n", b"hello" + SMUGGLED),
    "content-length 5.0": post("Content-Length: 5.0\r\n", b"hello" + SMUGGLED),
    "content-length empty": post("Content-Length: \r\n", b"hello" + SMUGGLED),
    "content-length 1e1": post("Content-Length: 1e1\r\n", b"hello" + SMUGGLED),
    "content-length overflow": post(
        "Content-Length: 99999999999999999999999\r\n", b"hello" + SMUGGLED
    ),
    "content-length two headers": post(
        "Content-Length: 5\r\nContent-Length: 6\r\n", b"helloX" + SMUGGLED
    ),
    "content-length two equal headers": post(
        "Content-Length: 5\r\nContent-Length: 5\r\n", b"hello" + SMUGGLED
    ),
    "chunk size bad hex": post("Transfer-Encoding: chunked\r\n", b"zz\r\nhello\r\n0\r\n\r\n"),
    "chunk size 0x prefix": post(
        "Transfer-Encoding: chunked\r\n", b"0x5\r\nhello\r\n0\r\n\r\n" + SMUGGLED
    ),
    "chunk size negative": post("Transfer-Encoding: chunked\r\n", b"-5\r\nhello\r\n0\r\n\r\n"),
    "chunk size trailing space": post(
        "Transfer-Encoding: chunked\r\n", b"5 \r\nhello\r\n0\r\n\r\n" + SMUGGLED
    ),
    "chunk data without CRLF": post(
        "Transfer-Encoding: chunked\r\n", b"5\r\nhelloXX0\r\n\r\n" + SMUGGLED
    ),
    "chunk size overflow 64 bit": post(
        "Transfer-Encoding: chunked\r\n", b"10000000000000005\r\nhello\r\n0\r\n\r\n" + SMUGGLED
    ),
    "chunk size overflow 80 bit": post(
        "Transfer-Encoding: chunked\r\n", b"ffffffffffffffffffff\r\nhello\r\n0\r\n\r\n"
    ),
    "chunk lines ending in bare LF": post(
        "Transfer-Encoding: chunked\r\n", b"5\nhello\n0\n\n" + SMUGGLED
    ),
    "chunk extension with control character": post(
        "Transfer-Encoding: chunked\r\n", b"5;a=\x01b\r\nhello\r\n0\r\n\r\n" + SMUGGLED
    ),
    "chunk extension with bare LF": post(
        "Transfer-Encoding: chunked\r\n", b"5;a\nb\r\nhello\r\n0\r\n\r\n" + SMUGGLED
    ),
    "chunk extension with bare CR in quotes": post(
        "Transfer-Encoding: chunked\r\n", b'5;x="a\rb"\r\nhello\r\n0\r\n\r\n' + SMUGGLED
    ),
    "last chunk with unterminated quoted extension": post(
        "Transfer-Encoding: chunked\r\n", b'5\r\nhello\r\n0;x="a\r\n\r\n' + SMUGGLED
    ),
    "malformed trailer": post(
        "Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\nBad Trailer\r\n\r\n" + SMUGGLED
    ),
}


@pytest.mark.parametrize("data", [pytest.param(v, id=k) for k, v in AMBIGUOUS.items()])
async def test_ambiguous_framing_is_refused_and_the_connection_closed(
    rig: Rig, data: bytes
) -> None:
    await rig.refused(data, 400, closes=True, code="bad_request", not_echoed=b"smuggled")


async def test_empty_transfer_encoding_before_content_length_is_refused(rig: Rig) -> None:
    data = post("Transfer-Encoding: \r\nContent-Length: 5\r\n", b"hello" + SMUGGLED)
    await rig.refused(data, 400, closes=True, not_echoed=b"smuggled")


async def test_transfer_encoding_on_http_1_0_is_refused(rig: Rig) -> None:
    await rig.refused(post("Transfer-Encoding: chunked\r\n", CHUNKED_HELLO, version="1.0"))


@pytest.mark.parametrize("coding", ["gzip", "deflate", "identity", "x-foo"])
async def test_unknown_transfer_coding_is_refused(rig: Rig, coding: str) -> None:
    data = post(f"Transfer-Encoding: {coding}, chunked\r\n", CHUNKED_HELLO)
    await rig.refused(data, (400, 501), closes=None)


VALID = {
    "content-length": (post("Content-Length: 5\r\n", b"hello"), b"hello"),
    "content-length with OWS": (post("Content-Length:  5 \r\n", b"hello"), b"hello"),
    "content-length leading zeros": (post("Content-Length: 005\r\n", b"hello"), b"hello"),
    "content-length zero": (post("Content-Length: 0\r\n", b""), b""),
    "chunked": (post("Transfer-Encoding: chunked\r\n", CHUNKED_HELLO), b"hello"),
    "chunked with tab OWS": (post("Transfer-Encoding:\tchunked\r\n", CHUNKED_HELLO), b"hello"),
    "chunked upper case": (post("Transfer-Encoding: CHUNKED\r\n", CHUNKED_HELLO), b"hello"),
    "chunked with empty list element": (
        post("Transfer-Encoding: ,chunked\r\n", CHUNKED_HELLO),
        b"hello",
    ),
    "chunked in several chunks": (
        post("Transfer-Encoding: chunked\r\n", b"2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n"),
        b"hello",
    ),
    "chunk upper-case hex": (
        post("Transfer-Encoding: chunked\r\n", b"A\r\nhellohello\r\n0\r\n\r\n"),
        b"hellohello",
    ),
    "chunk extension": (
        post("Transfer-Encoding: chunked\r\n", b"5;name=value\r\nhello\r\n0\r\n\r\n"),
        b"hello",
    ),
    "binary body with CRLFs and a request inside": (
        post(f"Content-Length: {len(SMUGGLED) + 3}\r\n", b"\x00\r\n" + SMUGGLED),
        b"\x00\r\n" + SMUGGLED,
    ),
    "GET with a body": (
        f"GET http://{API}/p HTTP/1.1\r\nHost: {API}\r\nContent-Length: 5\r\n\r\nhello".encode(),
        b"hello",
    ),
}


@pytest.mark.parametrize(("data", "body"), [pytest.param(*v, id=k) for k, v in VALID.items()])
async def test_unambiguous_body_is_forwarded_once_byte_for_byte(
    rig: Rig, data: bytes, body: bytes
) -> None:
    await rig.forwarded(data, body=body)


async def test_chunked_trailers_do_not_reach_the_upstream(rig: Rig) -> None:
    """Trailers could carry an Authorization or a hop-by-hop field past the header rules."""
    data = post(
        "Transfer-Encoding: chunked\r\n",
        b"5\r\nhello\r\n0\r\nAuthorization: Bearer client-own\r\nX-Trailer: 1\r\n\r\n",
    )
    request = await rig.forwarded(data, body=b"hello")
    assert b"client-own" not in bytes(rig.a.connections[0].raw)
    assert request.trailers == []


async def test_a_request_after_a_chunked_body_is_a_pipelined_request_of_its_own(
    rig: Rig,
) -> None:
    """Not smuggling: after a complete chunked body the next request is answered in order."""
    reply = await rig.send(post("Transfer-Encoding: chunked\r\n", CHUNKED_HELLO) + SMUGGLED)
    assert reply.error is None
    assert reply.statuses == [200, 200]
    assert [r.target for r in rig.a.requests] == [b"/p", b"/smuggled"]
    assert [bytes(r.body) for r in rig.a.requests] == [b"hello", b""]
    rig.assert_upstream_clean()


async def test_pipelined_requests_get_their_answers_in_order(rig: Rig) -> None:
    data = b"".join(
        f"GET http://{API}/{n} HTTP/1.1\r\nHost: {API}\r\n\r\n".encode() for n in range(5)
    )
    reply = await rig.send(data)
    assert reply.error is None
    assert reply.statuses == [200] * 5
    assert [r.target for r in rig.a.requests] == [f"/{n}".encode() for n in range(5)]
    rig.assert_upstream_clean()


async def test_a_valid_request_pipelined_before_a_malformed_one_is_not_run_unseen(
    rig: Rig,
) -> None:
    """aiohttp's parser rejects the whole segment, so the valid request before the
    garbage is answered by the one 400 and the connection closes. What matters is that it
    never runs upstream without the client being told: the client sees a failure for it
    and may retry, nothing is executed twice. (Answering it 200 first, as HAProxy does,
    would need a parser that hands back the messages before an error; docs/security.md.)"""
    data = f"GET http://{API}/first HTTP/1.1\r\nHost: {API}\r\n\r\nGARBAGE\r\n\r\n".encode()
    reply = await rig.send(data)
    assert reply.statuses == [400]
    assert reply.closed
    assert rig.requests == []
    assert rig.upstream_connections == 0
    await rig.assert_still_serves()


async def test_compressed_request_body_is_forwarded_unchanged(rig: Rig) -> None:
    compressed = gzip.compress(b"hello world" * 10)
    data = post(f"Content-Encoding: gzip\r\nContent-Length: {len(compressed)}\r\n", compressed)
    request = await rig.forwarded(data, body=compressed)
    assert request.header("Content-Encoding") == [b"gzip"]


async def test_body_labelled_gzip_that_is_not_gzip_is_forwarded_unchanged(rig: Rig) -> None:
    data = post("Content-Encoding: gzip\r\nContent-Length: 5\r\n", b"hello")
    await rig.forwarded(data, body=b"hello")
