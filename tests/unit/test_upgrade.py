"""The pure rules of protocol upgrades: what is forwarded, what a 101 may name."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from m2m_proxy.upgrade import ProtocolSwitch, forwarded_protocols, protocol_names, switch_accepted

WEBSOCKET = frozenset({"websocket"})


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


UPGRADE = headers(("Connection", "keep-alive, Upgrade"), ("Upgrade", "WebSocket"))


def test_protocol_names_are_lower_cased_without_versions() -> None:
    assert protocol_names(["WebSocket, Foo/2", " , h2c"]) == ["websocket", "foo", "h2c"]


def test_an_allowed_upgrade_on_a_bodyless_http11_get_is_forwarded() -> None:
    assert forwarded_protocols("GET", True, False, UPGRADE, WEBSOCKET) == "WebSocket"


@pytest.mark.parametrize(
    ("method", "http11", "has_body", "allowed"),
    [
        ("POST", True, False, WEBSOCKET),
        ("GET", False, False, WEBSOCKET),
        ("GET", True, True, WEBSOCKET),
        ("GET", True, False, frozenset()),
        ("GET", True, False, frozenset({"tcp"})),
    ],
    ids=["post", "http10", "body", "no-allowance", "other-protocol"],
)
def test_anything_else_is_an_ordinary_request(
    method: str, http11: bool, has_body: bool, allowed: frozenset[str]
) -> None:
    assert forwarded_protocols(method, http11, has_body, UPGRADE, allowed) is None


def test_upgrade_without_connection_upgrade_is_not_a_switch() -> None:
    only = headers(("Upgrade", "websocket"), ("Connection", "keep-alive"))
    assert forwarded_protocols("GET", True, False, only, WEBSOCKET) is None


def test_only_the_allowed_protocols_of_an_offer_are_forwarded() -> None:
    offer = headers(("Connection", "Upgrade"), ("Upgrade", "h2c, websocket"), ("Upgrade", "x/1"))
    assert forwarded_protocols("GET", True, False, offer, WEBSOCKET) == "websocket"
    h2c = headers(("Connection", "Upgrade"), ("Upgrade", "h2c"))
    assert forwarded_protocols("GET", True, False, h2c, WEBSOCKET) is None


@pytest.mark.parametrize(
    ("answered", "accepted"),
    [
        (["websocket"], True),
        (["WebSocket"], True),
        (["h2c"], False),
        (["websocket, h2c"], False),
        ([], False),
        ([""], False),
    ],
)
def test_a_101_must_name_only_protocols_that_were_asked_for(
    answered: list[str], accepted: bool
) -> None:
    assert switch_accepted("websocket", answered) is accepted


def test_the_switch_adds_connection_and_upgrade_to_the_upstream_headers() -> None:
    out: CIMultiDict[str] = CIMultiDict({"Host": "a", "Authorization": "Bearer t"})
    ProtocolSwitch("websocket", 300.0).apply(out)
    assert out["Connection"] == "Upgrade"
    assert out["Upgrade"] == "websocket"
    assert out["Authorization"] == "Bearer t"
