"""Request-target and Host confusion: routing follows the absolute URL, never a
conflicting Host; user information, bad ports and lookalike hosts never get a token."""

from __future__ import annotations

import pytest

from tests.security.rig import API, OTHER, Rig


def request(target: str, host: str = API, *, extra: str = "") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


async def test_absolute_form_wins_over_a_conflicting_host_header(rig: Rig) -> None:
    await rig.forwarded(request(f"http://{API}/p", OTHER), to="a")
    rig.reset()
    await rig.forwarded(request(f"http://{OTHER}/p", API), to="b")


async def test_origin_form_is_routed_by_host(rig: Rig) -> None:
    await rig.forwarded(request("/p", OTHER), to="b")


ROUTED_TO_API = {
    "upper-case host": request("http://API.EXAMPLE.COM/p", "API.EXAMPLE.COM"),
    "mixed-case scheme": request(f"HtTp://{API}/p"),
    "explicit default port": request(f"http://{API}:80/p"),
    "trailing dot": request(f"http://{API}./p", f"{API}."),
    "origin form, Host with default port": request("/p", f"{API}:80"),
    "origin form, Host with OWS": request("/p", f"\t{API} "),
    "origin form, upper-case Host": request("/p", API.upper()),
}


@pytest.mark.parametrize("data", [pytest.param(v, id=k) for k, v in ROUTED_TO_API.items()])
async def test_equivalent_spellings_of_the_routed_host_get_its_route(rig: Rig, data: bytes) -> None:
    await rig.forwarded(data, to="a")


async def test_query_without_path_is_forwarded_with_a_root_path(rig: Rig) -> None:
    await rig.forwarded(request(f"http://{API}?x=1"), target=b"/?x=1")


REFUSED_400 = {
    "userinfo": request(f"http://user@{API}/p"),
    "userinfo with password": request(f"http://user:pass@{API}/p"),
    "a@b": request(f"http://{OTHER}@{API}/p"),
    "a@b reversed": request(f"http://{API}@{OTHER}/p"),
    "userinfo in Host": request("/p", f"user@{API}"),
    "port 0": request(f"http://{API}:0/p"),
    "port 65536": request(f"http://{API}:65536/p"),
    "port -1": request(f"http://{API}:-1/p"),
    "port 99999": request(f"http://{API}:99999/p"),
    "port with a letter": request(f"http://{API}:8O/p"),
    "empty port": request(f"http://{API}:/p"),
    "Host port 0": request("/p", f"{API}:0"),
    "two trailing dots": request(f"http://{API}../p"),
    "empty host": request("http:///p"),
    "percent-encoded host": request("http://api%2eexample.com/p", "x"),
    "backslash authority": request(f"http://{API}\\@evil.test/p", "x"),
    "Host list": request("/p", f"{API}, {OTHER}"),
    "empty Host": request("/p", ""),
    "fragment": request(f"http://{API}/p#frag"),
    "dot-dot segment": request(f"http://{API}/a/../b"),
    "encoded dot-dot segment": request(f"http://{API}/a/%2E%2e/b"),
    "non-http scheme": request(f"ftp://{API}/p"),
    "asterisk form": b"OPTIONS * HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    "authority form outside CONNECT": request(f"{API}:80"),
    "raw UTF-8 IDN": "GET http://\u0430pi.example.com/p HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    "UTF-8 IDN in Host": "GET /p HTTP/1.1\r\nHost: \u0430pi.example.com\r\n\r\n".encode(),
    "space in target": request(f"http://{API}/p q"),
    "DEL in target": request(f"http://{API}/p\x7fq"),
}


@pytest.mark.parametrize("data", [pytest.param(v, id=k) for k, v in REFUSED_400.items()])
async def test_unusable_target_or_host_is_refused_without_an_upstream_connection(
    rig: Rig, data: bytes
) -> None:
    await rig.refused(data, 400, closes=None, code="bad_request")


REFUSED_403 = {
    "suffix lookalike": request(f"http://{API}.evil.test/p", f"{API}.evil.test"),
    "concatenated lookalike": request("http://api.example.comevil.test/p", "x"),
    "prefix lookalike": request("http://evilapi.example.com/p", "x"),
    "subdomain of the routed host": request(f"http://x.{API}/p", "x"),
    "hyphen lookalike": request("http://api-example.com/p", "x"),
    "other TLD": request("http://api.example.co/p", "x"),
    "punycode lookalike": request("http://xn--pi-7kc.example.com/p", "x"),
    "routed host on another port": request(f"http://{API}:8080/p"),
    "origin form, Host on another port": request("/p", f"{API}:8080"),
    "metadata address": request("http://169.254.169.254/latest/meta-data/", "x"),
    "loopback literal": request("http://127.0.0.1:9/p", "x"),
    "IPv6 loopback": request("http://[::1]/p", "x"),
    "https target over an http upstream": request(f"https://{API}/p"),
}


@pytest.mark.parametrize("data", [pytest.param(v, id=k) for k, v in REFUSED_403.items()])
async def test_lookalike_or_unrouted_destination_gets_403_and_no_token(
    rig: Rig, data: bytes
) -> None:
    await rig.refused(data, 403, closes=None)
    assert rig.token_requests in ([], ["/token/a"])  # only assert_still_serves' fetch


async def test_path_that_looks_like_an_authority_stays_a_path_on_the_routed_upstream(
    rig: Rig,
) -> None:
    """'//other.example.com/p' is a path on api.example.com; it never reaches b."""
    await rig.forwarded(request(f"http://{API}//{OTHER}/p"), target=f"//{OTHER}/p".encode())
