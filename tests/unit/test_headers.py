"""Header rules both ways: hop-by-hop, Connection-named, Proxy-*, Authorization, Via."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from m2m_proxy import headers as rules
from m2m_proxy.headers import downstream_response_headers, upstream_request_headers

TOKEN = "Bearer proxy-token-9f2c"
VIA = "1.1 m2m-proxy"

HOP_BY_HOP = [
    ("Connection", "keep-alive"),
    ("Keep-Alive", "timeout=5"),
    ("Proxy-Connection", "keep-alive"),
    ("TE", "trailers"),
    ("Trailer", "X-Checksum"),
    ("Transfer-Encoding", "chunked"),
    ("Upgrade", "websocket"),
    ("Proxy-Authorization", "Basic cHJveHk6cHc="),
    ("Proxy-Authenticate", "Basic"),
]


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def up(
    *pairs: tuple[str, str], authorization: str | None = TOKEN, host: str = "api.example.com"
) -> CIMultiDict[str]:
    return upstream_request_headers(
        headers(*pairs), host=host, authorization=authorization, via=VIA
    )


def down(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return downstream_response_headers(headers(*pairs), via=VIA)


def test_end_to_end_request_headers_pass_upstream_in_order_with_repeats() -> None:
    out = up(("Accept", "a/b"), ("X-Trace", "1"), ("X-Trace", "2"), ("Cookie", "c=1"))
    assert out.getall("X-Trace") == ["1", "2"]
    assert out["Accept"] == "a/b"
    assert out["Cookie"] == "c=1"


def test_hop_by_hop_request_headers_are_removed() -> None:
    out = up(*HOP_BY_HOP, ("Accept", "*/*"))
    assert sorted(out.keys()) == ["Accept", "Authorization", "Host", "Via"]


def test_hop_by_hop_response_headers_are_removed() -> None:
    out = down(*HOP_BY_HOP, ("Content-Type", "text/plain"))
    assert sorted(out.keys()) == ["Content-Type", "Via"]


def test_fields_named_in_connection_are_removed_upstream() -> None:
    out = up(
        ("Connection", "X-Secret-Hop, x-other"),
        ("Connection", "close"),
        ("X-Secret-Hop", "1"),
        ("X-Other", "2"),
        ("X-Kept", "3"),
    )
    assert "X-Secret-Hop" not in out
    assert "X-Other" not in out
    assert out["X-Kept"] == "3"


def test_fields_named_in_connection_are_removed_downstream() -> None:
    out = down(("Connection", "x-hop"), ("X-Hop", "1"), ("X-Kept", "2"))
    assert "X-Hop" not in out
    assert out["X-Kept"] == "2"


def test_connection_authorization_cannot_remove_the_injected_token() -> None:
    out = up(("Connection", "Authorization"), ("Authorization", "Bearer client-own"))
    assert out.getall("Authorization") == [TOKEN]


def test_connection_authorization_removes_the_clients_own_when_no_token_is_added() -> None:
    out = up(("Connection", "authorization"), ("Authorization", "Basic x"), authorization=None)
    assert "Authorization" not in out


def test_other_proxy_headers_are_removed_both_ways() -> None:
    assert "Proxy-Foo" not in up(("Proxy-Foo", "1"), ("proxy-bar", "2"))
    assert "proxy-bar" not in up(("Proxy-Foo", "1"), ("proxy-bar", "2"))
    assert "Proxy-Status" not in down(("Proxy-Status", "upstream-proxy; error=x"))


def test_exactly_one_authorization_reaches_upstream_when_a_token_is_given() -> None:
    out = up(
        ("Authorization", "Bearer client-1"),
        ("authorization", "Basic client-2"),
        ("Accept", "*/*"),
    )
    assert out.getall("Authorization") == [TOKEN]


def test_clients_authorization_passes_untouched_without_a_token() -> None:
    out = up(("Authorization", "Bearer client-own"), authorization=None)
    assert out.getall("Authorization") == ["Bearer client-own"]


def test_no_authorization_is_invented_without_a_token() -> None:
    assert "Authorization" not in up(("Accept", "*/*"), authorization=None)


def test_host_is_set_to_the_destination_once() -> None:
    out = up(("Host", "client-chose.example.net"), host="api.example.com:8443")
    assert out.getall("Host") == ["api.example.com:8443"]


def test_framing_headers_are_never_copied_upstream() -> None:
    out = up(("Content-Length", "5"), ("Transfer-Encoding", "chunked"), ("Content-Type", "a/b"))
    assert "Content-Length" not in out
    assert "Transfer-Encoding" not in out
    assert out["Content-Type"] == "a/b"


def test_expect_is_not_forwarded_upstream() -> None:
    # The proxy's server side already answered 100-continue and holds the body.
    out = up(("Expect", "100-continue"), ("Content-Type", "a/b"))
    assert "Expect" not in out
    assert out["Content-Type"] == "a/b"


def test_content_length_is_kept_downstream_even_if_connection_names_it() -> None:
    out = down(("Connection", "content-length"), ("Content-Length", "42"))
    assert out.getall("Content-Length") == ["42"]


def test_via_is_appended_after_the_existing_via_values() -> None:
    assert up(("Via", "1.0 corp-gw")).getall("Via") == ["1.0 corp-gw", VIA]
    assert down(("Via", "1.1 cdn")).getall("Via") == ["1.1 cdn", VIA]
    assert up().getall("Via") == [VIA]


def test_downstream_never_carries_the_upstream_request_token() -> None:
    # The response side never adds Authorization; a WWW-Authenticate challenge passes.
    out = down(("WWW-Authenticate", 'Bearer error="invalid_token"'))
    assert "Authorization" not in out
    assert out["WWW-Authenticate"] == 'Bearer error="invalid_token"'


def test_input_headers_are_not_modified() -> None:
    incoming = headers(("Connection", "x-hop"), ("X-Hop", "1"), ("Authorization", "Basic a"))
    upstream_request_headers(incoming, host="h", authorization=TOKEN, via=VIA)
    assert list(incoming.items()) == [
        ("Connection", "x-hop"),
        ("X-Hop", "1"),
        ("Authorization", "Basic a"),
    ]


@pytest.mark.parametrize("case", [str.lower, str.upper])
def test_hop_by_hop_rules_ignore_the_case_of_names_both_ways(
    case: Callable[[str], str],
) -> None:
    pairs = [(case(name), value) for name, value in HOP_BY_HOP]
    assert list(up(*pairs, ("X-Keep", "1")).keys()) == ["Host", "X-Keep", "Authorization", "Via"]
    assert list(down(*pairs, ("X-Keep", "1")).keys()) == ["X-Keep", "Via"]


def test_lower_case_host_authorization_and_length_from_the_client_are_replaced() -> None:
    out = up(
        ("host", "evil.example"),
        ("authorization", "Bearer client"),
        ("content-length", "5"),
        ("expect", "100-continue"),
    )
    assert out.getall("Host") == ["api.example.com"]
    assert out.getall("Authorization") == [TOKEN]
    assert "Content-Length" not in out
    assert "Expect" not in out


def test_a_large_response_head_is_filtered_the_same_and_not_memoised() -> None:
    many = [(f"X-Field-{i:04d}", "v") for i in range(120)]  # names over 1 KiB together
    before = rules._layout.cache_info().currsize
    out = down(*many, ("Connection", "X-Field-0007"), ("Keep-Alive", "timeout=5"))
    assert rules._layout.cache_info().currsize == before
    assert "X-Field-0007" not in out and "Keep-Alive" not in out
    # 120 fields, less the one Connection names, plus Via
    assert len(out) == len(many) and out.getall("Via") == [VIA]
