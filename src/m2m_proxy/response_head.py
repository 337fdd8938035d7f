"""The head of a response relayed whole, serialised by the proxy in one pass. Pure.

When the upstream's response has arrived complete and states its length, the proxy
writes head and body to the client in one write of its own instead of going through
aiohttp's StreamResponse (a header map, prepare, the serialiser, write_eof): about
20 k fewer instructions of the ~338 k a forwarded request costs. The bytes are those
the StreamResponse path sends (tests/unit/test_response_head.py compares the two):
the fields headers.py keeps, Via, then what aiohttp adds: Server when the upstream
sent none, ``Content-Type: application/octet-stream`` for a non-empty body without
one, Date, and the Connection field the client's HTTP version needs for keep-alive.

Every other case returns None and takes the StreamResponse path: HEAD, 1xx, 204,
304, a Content-Length missing, repeated or not equal to the body's length, a CR or
LF inside any text (neither upstream client lets one through; other control
characters they refuse with a 502). One difference is deliberate: text is encoded
as UTF-8 with surrogateescape, so obs-text bytes in an upstream's field value reach
the client as they came (aiohttp's serialiser cuts the value short at the first).
"""

from __future__ import annotations

from aiohttp.helpers import rfc822_formatted_time
from multidict import CIMultiDict, CIMultiDictProxy

from m2m_proxy.headers import kept_response_fields

_BODYLESS_STATUSES = frozenset({204, 304})


def relayed_head(
    *,
    http10: bool,
    keep_alive: bool,
    method: str,
    status: int,
    reason: str,
    upstream: CIMultiDictProxy[str] | CIMultiDict[str],
    body_length: int,
    via: str,
    server: str,
) -> bytes | None:
    """Status line, fields and blank line for a response whose body (``body_length``
    bytes) follows at once; None when the StreamResponse path must write it.

    ``http10``: the client spoke HTTP/1.0; ``keep_alive``: the connection stays open
    after this response (aiohttp's ``request.keep_alive``); ``via`` is the Via value
    to append, ``server`` the Server value used when the upstream sent none.
    """
    if method == "HEAD" or status < 200 or status in _BODYLESS_STATUSES:
        return None
    lengths = upstream.getall("Content-Length", ())
    if len(lengths) != 1 or lengths[0] != str(body_length):
        return None
    fields, present = kept_response_fields(upstream)
    lines = [f"{'HTTP/1.0' if http10 else 'HTTP/1.1'} {status} {reason}"]
    lines += map(": ".join, fields)
    lines.append(f"Via: {via}")
    if "server" not in present:
        lines.append(f"Server: {server}")
    if body_length and "content-type" not in present:
        lines.append("Content-Type: application/octet-stream")
    if "date" not in present:
        lines.append(f"Date: {rfc822_formatted_time()}")
    if http10:
        if keep_alive:
            lines.append("Connection: keep-alive")
    elif not keep_alive:
        lines.append("Connection: close")
    lines.append("\r\n")
    head = "\r\n".join(lines)
    # One CR and one LF per line, none more: no text from outside may hold either.
    if head.count("\n") != len(lines) or head.count("\r") != len(lines):
        return None
    return head.encode("utf-8", "surrogateescape")
