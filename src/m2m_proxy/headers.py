"""Header rules for both directions of a forwarded exchange. Pure functions.

Hop-by-hop fields (RFC 9110 §7.6.1) are removed each way: the fixed set, every
``Proxy-*`` field, and any field named in ``Connection``. On the way up, Host is
set to the destination's authority, the credential (if any) replaces whatever
Authorization the client sent (exactly one reaches the upstream, added after the
removal so ``Connection: Authorization`` cannot strip it), and Via is appended.
Content-Length and Transfer-Encoding are never copied: the sending side re-frames.
Expect is not forwarded: the proxy's server side has already answered 100-continue.
"""

from __future__ import annotations

import functools
import operator

from multidict import CIMultiDict, CIMultiDictProxy, istr

# Lower-case names: header names arrive in any case, so every test lower-cases first.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)
# Expect: the proxy answers 100-continue itself and has the body (or its start) in hand.
_UPSTREAM_DROP = HOP_BY_HOP | {"host", "content-length", "expect"}
_UPSTREAM_DROP_WITH_TOKEN = _UPSTREAM_DROP | {"authorization"}
_AUTHORIZATION = istr("Authorization")
_HOST = istr("Host")
_VIA = istr("Via")
_NAME = operator.itemgetter(0)


def _connection_named(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """Lower-cased field names listed in Connection headers."""
    values = headers.getall("Connection", ())
    if len(values) == 1:
        return _names_in(values[0])
    return frozenset().union(*(_names_in(value) for value in values))


@functools.lru_cache(maxsize=256)
def _names_in(value: str) -> frozenset[str]:
    """'keep-alive, X-Foo' → {'keep-alive', 'x-foo'}; memoised: a handful of values recur."""
    return frozenset(name.strip().lower() for name in value.split(",") if name.strip())


def upstream_request_headers(
    incoming: CIMultiDictProxy[str], *, host: str, authorization: str | None, via: str
) -> CIMultiDict[str]:
    """Headers to send upstream.

    ``authorization`` None means "no credential for this request" (unmatched
    passthrough): then the client's own Authorization passes through untouched.
    """
    named = _connection_named(incoming) if "Connection" in incoming else frozenset()
    drop = _UPSTREAM_DROP if authorization is None else _UPSTREAM_DROP_WITH_TOKEN
    out: CIMultiDict[str] = CIMultiDict()
    out[_HOST] = host
    for name, value in incoming.items():
        lname = name.lower()
        if lname in drop or lname.startswith("proxy-") or lname in named or "_" in name:
            continue  # underscores: X_Auth vs X-Auth ambiguity in CGI-style upstreams
        out.add(name, value)
    if authorization is not None:
        out[_AUTHORIZATION] = authorization
    out.add(_VIA, via)
    return out


@functools.lru_cache(maxsize=256)
def received_by(via: str) -> frozenset[str]:
    """The received-by names of a Via header value: '1.1 a, HTTP/1.0 b (c)' → {a, b}."""
    names = set()
    for element in via.split(","):
        parts = element.split()
        if len(parts) >= 2:
            names.add(parts[1])
    return frozenset(names)


def kept_response_fields(
    incoming: CIMultiDictProxy[str] | CIMultiDict[str],
) -> tuple[list[tuple[str, str]], frozenset[str]]:
    """The upstream's response fields the client gets, in order, and their lower-cased
    names: no hop-by-hop field, none its Connection header names (but Content-Length:
    it keeps the framing).

    Which fields go depends only on the names, in order, and the Connection values:
    that layout is memoised (an upstream answers with the same few layouts), so a
    response costs C-level calls only, no Python step per field.
    """
    items = list(incoming.items())
    # (Not incoming.keys(): multidict's view yields a repeated name once.)
    names = "\n".join(map(_NAME, items)).lower()
    connection = tuple(incoming.getall("Connection", ()))
    # Memoised for ordinary heads only, so the cache holds at most ~1024 x 2 KiB.
    ordinary = len(names) <= 1024 and sum(map(len, connection)) <= 1024
    layout = _layout if ordinary else _layout.__wrapped__
    kept, kept_names = layout(names, connection)
    return (items if kept is None else list(map(items.__getitem__, kept))), kept_names


@functools.lru_cache(maxsize=1024)
def _layout(
    names: str, connection: tuple[str, ...]
) -> tuple[tuple[int, ...] | None, frozenset[str]]:
    """For lower-cased field names joined by LF and the Connection values: the
    positions of the fields kept (None: all of them) and the names kept."""
    lowered = names.split("\n") if names else []
    drop = set(HOP_BY_HOP)
    for value in connection:
        drop |= _names_in(value)
    drop.discard("content-length")
    kept = [
        i for i, name in enumerate(lowered) if name not in drop and not name.startswith("proxy-")
    ]
    kept_names = frozenset(lowered[i] for i in kept)
    return (None if len(kept) == len(lowered) else tuple(kept)), kept_names


def downstream_response_headers(
    incoming: CIMultiDictProxy[str] | CIMultiDict[str], *, via: str
) -> CIMultiDict[str]:
    """Headers to send back to the client; Content-Length is kept so framing is kept."""
    out: CIMultiDict[str] = CIMultiDict(kept_response_fields(incoming)[0])
    out.add(_VIA, via)
    return out
