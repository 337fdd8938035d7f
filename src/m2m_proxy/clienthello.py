"""The server name (SNI, RFC 6066 §3) of a TLS ClientHello, read from the first record.

Used in transparent mode, where a redirected connection starts with TLS and the SNI
is the only sign of where it was going. Pure: bytes in, name out; anything malformed
is reported as such, never guessed.
"""

from __future__ import annotations

from typing import NamedTuple

HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_SERVER_NAME_EXTENSION = 0x0000
_HOST_NAME = 0x00
RECORD_HEADER_BYTES = 5
MAX_RECORD_BYTES = RECORD_HEADER_BYTES + 16384


class ClientHelloError(ValueError):
    """The bytes are not a well-formed TLS ClientHello."""


class Hello(NamedTuple):
    server_name: str | None
    """The host_name SNI entry, lower case without a trailing dot; None when absent."""


def looks_like_tls(head: bytes) -> bool:
    """A TLS handshake record (0x16 0x03 ...) starts the connection."""
    return len(head) >= 2 and head[0] == HANDSHAKE and head[1] == 0x03


def record_length(head: bytes) -> int | None:
    """The total length of the first record, once its 5-byte header is in ``head``."""
    if len(head) < RECORD_HEADER_BYTES:
        return None
    return RECORD_HEADER_BYTES + int.from_bytes(head[3:5], "big")


def parse_client_hello(record: bytes) -> Hello:
    """The SNI of the ClientHello in ``record`` (one complete TLS record)."""
    reader = _Reader(record)
    if reader.u8() != HANDSHAKE:
        raise ClientHelloError("not a TLS handshake record")
    reader.skip(2)  # legacy record version
    body = _Reader(reader.take(reader.u16()))
    if body.u8() != _CLIENT_HELLO:
        raise ClientHelloError("the first handshake message is not a ClientHello")
    hello = _Reader(body.take(body.u24()))
    hello.skip(2 + 32)  # client version, random
    hello.take(hello.u8())  # session id
    hello.take(hello.u16())  # cipher suites
    hello.take(hello.u8())  # compression methods
    if hello.remaining == 0:
        return Hello(None)  # no extensions at all
    extensions = _Reader(hello.take(hello.u16()))
    while extensions.remaining:
        kind, data = extensions.u16(), extensions.take(extensions.u16())
        if kind == _SERVER_NAME_EXTENSION:
            return Hello(_host_name(data))
    return Hello(None)


def _host_name(data: bytes) -> str | None:
    names = _Reader(data)
    entries = _Reader(names.take(names.u16()))
    while entries.remaining:
        kind, value = entries.u8(), entries.take(entries.u16())
        if kind == _HOST_NAME:
            try:
                name = value.decode("ascii")
            except UnicodeDecodeError:
                raise ClientHelloError("the server name is not ASCII") from None
            if not name or any(c <= " " or c in "/\\@" for c in name):
                raise ClientHelloError("the server name is not a host name")
            return name.lower().rstrip(".")
    return None


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._at

    def take(self, n: int) -> bytes:
        if n > self.remaining:
            raise ClientHelloError("truncated ClientHello")
        chunk = self._data[self._at : self._at + n]
        self._at += n
        return chunk

    def skip(self, n: int) -> None:
        self.take(n)

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u24(self) -> int:
        return int.from_bytes(self.take(3), "big")
