"""The HTTP/1.1 wire rules of the lean upstream client that need no socket. Pure.

A request head is written as the header map orders it, framing last. A response
head's fields, as llhttp hands them over, are judged by the limits aiohttp's client
applies (one field 8190 bytes, 128 fields) plus a cap on the whole head, so a peer
cannot grow memory without end before its headers complete.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from dataclasses import dataclass

from multidict import CIMultiDict

from m2m_proxy.errors import UpstreamProtocolError

MAX_FIELD_BYTES = 8190
"""Longest header name, header value or reason phrase (aiohttp's max_field_size)."""
MAX_FIELDS = 128
"""Most header fields in one response head (aiohttp's max_headers)."""
MAX_HEAD_BYTES = 64 * 1024
"""Longest response head, status line to blank line (Go: 10 MB, nginx: 4-8 KiB)."""

BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
"""Methods sent without ``Content-Length: 0`` when they carry no body (as aiohttp)."""
_REPLAYABLE_METHODS = BODYLESS_METHODS
_IDEMPOTENCY_HEADERS = ("Idempotency-Key", "X-Idempotency-Key")


@dataclass(frozen=True, slots=True)
class Framing:
    """How a request body is delimited on the wire."""

    header: str
    """The framing header line, CRLF included ('' for none)."""
    chunked: bool


NO_FRAMING = Framing("", chunked=False)
EMPTY_BODY = Framing("Content-Length: 0\r\n", chunked=False)
CHUNKED = Framing("Transfer-Encoding: chunked\r\n", chunked=True)


def framing(method: str, has_body: bool, content_length: int | None) -> Framing:
    """Content-Length when the length is known, chunked when it is not; a method that
    defines a meaning for content (POST, PUT, ...) says ``Content-Length: 0`` when it
    has none (RFC 9110 §8.6, and what aiohttp does)."""
    if not has_body:
        return NO_FRAMING if method in BODYLESS_METHODS else EMPTY_BODY
    if content_length is None:
        return CHUNKED
    if content_length == 0:
        return EMPTY_BODY
    return Framing(f"Content-Length: {content_length}\r\n", chunked=False)


class HeadInjectionError(ValueError):
    """A header name or value, the method or the target holds CR or LF."""


def request_head(method: str, target: str, headers: CIMultiDict[str], framing: Framing) -> bytes:
    """``METHOD target HTTP/1.1``, the headers in order, the framing header, CRLF.

    Text is encoded as UTF-8 with surrogateescape, so bytes the server side decoded
    that way (obs-text in a client's header) go out exactly as they came in.
    """
    parts = [method, " ", target, " HTTP/1.1\r\n"]
    for name, value in headers.items():
        parts += (name, ": ", value, "\r\n")
    # Even places hold what came from outside: method, target, each name and value.
    probe = "".join(parts[::2])
    if "\n" in probe or "\r" in probe:
        raise HeadInjectionError("a request header, the method or the target holds CR or LF")
    parts += (framing.header, "\r\n")
    return "".join(parts).encode("utf-8", "surrogateescape")


def chunk_prefix(size: int) -> bytes:
    """The size line of one chunk of a chunked body."""
    return b"%x\r\n" % size


LAST_CHUNK = b"0\r\n\r\n"
CRLF = b"\r\n"


def replayable(method: str, headers: Container[str]) -> bool:
    """May the request be sent again after the connection failed before any response?

    Go's net/http rule (``Request.isReplayable``): GET, HEAD, OPTIONS, TRACE, or any
    method with an ``Idempotency-Key`` / ``X-Idempotency-Key`` header. PUT and DELETE
    are idempotent by RFC 9110 but not retried, as in Go: fewer duplicates.
    ``headers`` is the request's case-insensitive header map.
    """
    if method in _REPLAYABLE_METHODS:
        return True
    return any(name in headers for name in _IDEMPOTENCY_HEADERS)


def persistent(version: str, connection: Iterable[str]) -> bool:
    """Keep-alive from the HTTP version ("1.1") and the Connection field values
    (RFC 9112 §9.3): HTTP/1.1 unless ``close``, HTTP/1.0 only with ``keep-alive``."""
    tokens = {t.strip().lower() for value in connection for t in value.split(",")}
    if "close" in tokens:
        return False
    return version not in ("1.0", "0.9") or "keep-alive" in tokens


def chunked_last(transfer_encoding: str) -> bool:
    """Is ``chunked`` the final transfer coding of a Transfer-Encoding value?"""
    return transfer_encoding.rsplit(",", 1)[-1].strip().lower() == "chunked"


class HeadRejectedError(UpstreamProtocolError):
    """Raised inside a parser callback; carried out of httptools as __context__."""


def response_fields(raw: list[bytes], reason_size: int) -> CIMultiDict[str]:
    """The header fields from llhttp's names and values (alternating), in order.

    Judged in one go rather than per field (each Python call costs): count and size
    as aiohttp's parser judges them, and the size of the whole head (llhttp, strict
    about header fields, has refused control characters); values lose trailing
    whitespace, which llhttp keeps (RFC 9110 §5.5); text is UTF-8 with
    surrogateescape, as aiohttp's.
    """
    if not raw:
        return CIMultiDict()
    if len(raw) > 2 * MAX_FIELDS:
        raise HeadRejectedError(f"the upstream sent more than {MAX_FIELDS} response headers")
    # LF cannot occur inside a field (it ends the line for llhttp), so it separates.
    joined = b"\n".join(raw)
    # The head's size from what was parsed, status line to blank line (the read that
    # completed the head may hold body bytes too; data_received caps earlier reads).
    if len(joined) + 3 * (len(raw) // 2) + reason_size + 18 > MAX_HEAD_BYTES:
        raise HeadRejectedError(f"the upstream's response head is over {MAX_HEAD_BYTES} bytes")
    if len(joined) > MAX_FIELD_BYTES and max(map(len, raw)) > MAX_FIELD_BYTES:
        raise HeadRejectedError(
            f"a response header field of the upstream is over {MAX_FIELD_BYTES} bytes"
        )
    text = joined.decode("utf-8", "surrogateescape")
    items = text.split("\n")
    if " \n" in text or "\t\n" in text or text[-1] in " \t":
        items[1::2] = [value.rstrip(" \t") for value in items[1::2]]
    pairs = iter(items)
    return CIMultiDict(list(zip(pairs, pairs, strict=False)))  # name, value, name, ...
