"""The lean upstream client's wire rules, without sockets."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from m2m_proxy.upstream.head import (
    CHUNKED,
    EMPTY_BODY,
    MAX_FIELD_BYTES,
    MAX_FIELDS,
    NO_FRAMING,
    HeadInjectionError,
    HeadRejectedError,
    chunk_prefix,
    chunked_last,
    framing,
    persistent,
    replayable,
    request_head,
    response_fields,
)


def test_request_head_keeps_order_case_and_duplicates_and_puts_framing_last() -> None:
    headers: CIMultiDict[str] = CIMultiDict(
        [("Host", "api.test"), ("x-lower", "1"), ("X-Dup", "a"), ("X-DUP", "b"), ("Via", "1.1 p")]
    )
    head = request_head("POST", "/p?q=%20", headers, framing("POST", True, 12))
    assert head == (
        b"POST /p?q=%20 HTTP/1.1\r\nHost: api.test\r\nx-lower: 1\r\nX-Dup: a\r\nX-DUP: b\r\n"
        b"Via: 1.1 p\r\nContent-Length: 12\r\n\r\n"
    )


def test_request_head_passes_obs_text_bytes_through_unchanged() -> None:
    # aiohttp's server decodes header bytes as UTF-8 with surrogateescape.
    value = b"caf\xe9 \xc3\xa9".decode("utf-8", "surrogateescape")
    head = request_head("GET", "/", CIMultiDict({"X-Text": value}), NO_FRAMING)
    assert b"X-Text: caf\xe9 \xc3\xa9\r\n" in head


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("GET", "/", {"X-A": "v\r\nInjected: 1"}),
        ("GET", "/", {"X-A": "bare\nLF"}),
        ("GET", "/", {"X-A": "bare\rCR"}),
        ("GET", "/", {"X-A\r\nInjected": "1"}),
        ("GET", "/ HTTP/1.1\r\nX: y\r\n\r\nGET /", {}),
        ("GET\r\n", "/", {}),
    ],
)
def test_request_head_refuses_line_breaks_anywhere_but_its_own(
    method: str, target: str, headers: dict[str, str]
) -> None:
    with pytest.raises(HeadInjectionError):
        request_head(method, target, CIMultiDict(headers), NO_FRAMING)


@pytest.mark.parametrize(
    ("method", "has_body", "length", "expected"),
    [
        ("GET", False, None, NO_FRAMING),
        ("HEAD", False, None, NO_FRAMING),
        ("DELETE", False, None, EMPTY_BODY),  # as aiohttp: not a "GET method"
        ("POST", False, None, EMPTY_BODY),
        ("POST", True, 0, EMPTY_BODY),
        ("POST", True, None, CHUNKED),
        ("GET", True, None, CHUNKED),
    ],
)
def test_framing(method: str, has_body: bool, length: int | None, expected: object) -> None:
    assert framing(method, has_body, length) == expected


def test_framing_with_a_known_length() -> None:
    assert framing("PUT", True, 1234).header == "Content-Length: 1234\r\n"
    assert not framing("PUT", True, 1234).chunked


def test_chunk_prefix_is_hex() -> None:
    assert chunk_prefix(255) == b"ff\r\n"
    assert chunk_prefix(1) == b"1\r\n"


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        ("GET", {}, True),
        ("HEAD", {}, True),
        ("OPTIONS", {}, True),
        ("TRACE", {}, True),
        ("POST", {}, False),
        ("PUT", {}, False),
        ("DELETE", {}, False),
        ("PATCH", {}, False),
        ("POST", {"idempotency-key": "k"}, True),
        ("POST", {"X-Idempotency-Key": "k"}, True),
    ],
)
def test_replayable_follows_go(method: str, headers: dict[str, str], expected: bool) -> None:
    assert replayable(method, CIMultiDict(headers)) is expected


@pytest.mark.parametrize(
    ("version", "connection", "expected"),
    [
        ("1.1", [], True),
        ("1.1", ["close"], False),
        ("1.1", ["Keep-Alive, CLOSE"], False),
        ("1.0", [], False),
        ("1.0", ["keep-alive"], True),
        ("1.1", ["upgrade", "x-close"], True),
    ],
)
def test_persistent(version: str, connection: list[str], expected: bool) -> None:
    assert persistent(version, connection) is expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("chunked", True), ("gzip, Chunked", True), ("chunked, gzip", False), ("gzip", False)],
)
def test_chunked_last(value: str, expected: bool) -> None:
    assert chunked_last(value) is expected


def test_response_fields_keep_order_case_and_duplicates_and_trim_trailing_space() -> None:
    raw = [b"Set-Cookie", b"a=1  ", b"x-lower", b"y", b"SET-COOKIE", b"b=2\t", b"X-E", b""]
    fields = response_fields(raw, 2)
    assert list(fields.items()) == [
        ("Set-Cookie", "a=1"),
        ("x-lower", "y"),
        ("SET-COOKIE", "b=2"),
        ("X-E", ""),
    ]
    assert fields.getall("set-cookie") == ["a=1", "b=2"]


def test_response_fields_decode_obs_text_as_aiohttp_does() -> None:
    fields = response_fields([b"X-T", b"caf\xe9 \xc3\xa9"], 2)
    assert fields["X-T"].encode("utf-8", "surrogateescape") == b"caf\xe9 \xc3\xa9"


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        ([b"X", b"v" * (MAX_FIELD_BYTES + 1)], "over 8190"),
        ([b"N" * (MAX_FIELD_BYTES + 1), b"v"], "over 8190"),
        ([f"X-{i}".encode() for i in range(MAX_FIELDS + 1) for _ in (0, 1)], "more than 128"),
        ([f"X-{i}".encode() if j == 0 else b"v" * 900 for i in range(80) for j in (0, 1)], "head"),
    ],
)
def test_response_fields_over_the_limits_are_refused(raw: list[bytes], detail: str) -> None:
    with pytest.raises(HeadRejectedError, match=detail):
        response_fields(raw, 2)


def test_response_fields_at_the_limits_are_accepted() -> None:
    raw = [b"X", b"v" * MAX_FIELD_BYTES] + [b"Y", b"v"] * (MAX_FIELDS - 1)
    assert len(response_fields(raw, 2)) == MAX_FIELDS
    assert len(response_fields([], 2)) == 0
