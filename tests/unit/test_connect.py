"""CONNECT: the head parser, the intercept/tunnel/deny decision, tunneled targets, SNI."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from m2m_proxy.clienthello import (
    ClientHelloError,
    looks_like_tls,
    parse_client_hello,
    record_length,
)
from m2m_proxy.config import ProxySettings, parse_config
from m2m_proxy.connect import Mode, decide, parse_connect_head
from m2m_proxy.errors import BadRequestError, MisdirectedRequestError, RouteDeniedError
from m2m_proxy.interception_ca import init_ca
from m2m_proxy.routing import RouteTable
from m2m_proxy.target import Target, TunnelOrigin, parse_tunneled_target

ROUTES = """
proxy:
  unmatched: {unmatched}
{proxy_extra}
clients:
  c:
    token_url: https://idp.example.com/token
    client_id: x
    client_secret: y
routes:
  - host: api.example.com
    client: c
    path_prefix: /v1
  - host: files.example.com:8443
    client: c
  - host: "*.blind.example.com"
    client: c
    https: tunnel
"""


def table(
    tmp_path: Path, unmatched: str = "deny", *, with_ca: bool = True
) -> tuple[RouteTable, ProxySettings]:
    extra = ""
    if with_ca:
        files = init_ca(tmp_path / "ca")
        extra = f"  ca_cert_file: {files.cert_file}\n  ca_key_file: {files.key_file}\n"
    config = parse_config(ROUTES.format(unmatched=unmatched, proxy_extra=extra), "r.yaml", {})
    return RouteTable(config.routes), config.proxy


def https(host: str, port: int | None = None) -> Target:
    return Target("https", host, port, "/")


# --- the CONNECT head -------------------------------------------------------------------


def test_connect_head_gives_the_destination() -> None:
    assert parse_connect_head(b"CONNECT API.Example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n") == https(
        "api.example.com"
    )
    assert parse_connect_head(b"CONNECT [::1]:8443 HTTP/1.1\r\n\r\n") == https("::1", 8443)


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (b"CONNECT api.example.com HTTP/1.1\r\n\r\n", "needs a port"),
        (b"CONNECT user@api.example.com:443 HTTP/1.1\r\n\r\n", "host:port, nothing else"),
        (b"CONNECT http://api.example.com:443/ HTTP/1.1\r\n\r\n", "host:port, nothing else"),
        (b"CONNECT api.example.com:99999 HTTP/1.1\r\n\r\n", "bad CONNECT target"),
        (b"CONNECT api.example.com:443 HTTP/2\r\n\r\n", "CONNECT host:port HTTP/1.1"),
        (b"CONNECT  api.example.com:443 HTTP/1.1\r\n\r\n", "CONNECT host:port HTTP/1.1"),
        (b"CONNECT \xff:443 HTTP/1.1\r\n\r\n", "not ASCII"),
    ],
)
def test_bad_connect_heads_are_400(head: bytes, reason: str) -> None:
    with pytest.raises(BadRequestError, match=reason):
        parse_connect_head(head)


# --- the decision -------------------------------------------------------------------------


def test_a_routed_host_is_intercepted_whatever_its_path_prefix(tmp_path: Path) -> None:
    routes, settings = table(tmp_path)
    decision = decide(https("api.example.com"), routes, settings)
    assert (decision.mode, decision.route) == (Mode.INTERCEPT, "api.example.com/v1")


def test_a_routed_port_is_allowed_and_another_port_is_not(tmp_path: Path) -> None:
    routes, settings = table(tmp_path)
    assert decide(https("files.example.com", 8443), routes, settings).mode is Mode.INTERCEPT
    with pytest.raises(RouteDeniedError, match="no route matches"):
        decide(https("files.example.com"), routes, settings)


def test_https_tunnel_routes_are_relayed(tmp_path: Path) -> None:
    routes, settings = table(tmp_path)
    decision = decide(https("a.blind.example.com"), routes, settings)
    assert decision.mode is Mode.TUNNEL


def test_unrouted_hosts_are_denied_or_tunnelled_on_allowed_ports(tmp_path: Path) -> None:
    routes, settings = table(tmp_path, "passthrough")
    assert decide(https("elsewhere.example.org"), routes, settings).mode is Mode.TUNNEL
    with pytest.raises(RouteDeniedError, match="port 22 is not allowed"):
        decide(https("elsewhere.example.org", 22), routes, settings)
    routes, settings = table(tmp_path / "deny", "deny")
    with pytest.raises(RouteDeniedError, match="no route matches"):
        decide(https("elsewhere.example.org"), routes, settings)


def test_interception_without_a_ca_is_refused_with_the_fix(tmp_path: Path) -> None:
    routes, settings = table(tmp_path, with_ca=False)
    with pytest.raises(RouteDeniedError, match="m2m-proxy ca init"):
        decide(https("api.example.com"), routes, settings)


# --- requests inside a tunnel ---------------------------------------------------------------

TUNNEL = TunnelOrigin("api.example.com", None)


@pytest.mark.parametrize(
    ("target", "host"),
    [
        ("/v1/x?y=1", "api.example.com"),
        ("/v1/x?y=1", "API.example.com:443"),
        ("/v1/x?y=1", None),
        ("https://api.example.com/v1/x?y=1", "whatever"),
    ],
)
def test_requests_for_the_tunnels_origin_pass(target: str, host: str | None) -> None:
    assert parse_tunneled_target(target, host, TUNNEL) == Target(
        "https", "api.example.com", None, "/v1/x?y=1"
    )


@pytest.mark.parametrize(
    ("target", "host"),
    [
        ("/x", "evil.example.com"),
        ("/x", "api.example.com:8443"),
        ("http://api.example.com/x", None),
        ("https://evil.example.com/x", "api.example.com"),
    ],
)
def test_requests_for_another_origin_are_misdirected(target: str, host: str | None) -> None:
    with pytest.raises(MisdirectedRequestError):
        parse_tunneled_target(target, host, TUNNEL)


def test_an_sni_mismatch_misdirects_every_request() -> None:
    with pytest.raises(MisdirectedRequestError, match="TLS server name"):
        parse_tunneled_target("/x", "api.example.com", replace_sni(TUNNEL))


def replace_sni(tunnel: TunnelOrigin) -> TunnelOrigin:
    return tunnel._replace(sni_mismatch=True)


def test_dot_segments_are_refused_inside_a_tunnel() -> None:
    with pytest.raises(BadRequestError):
        parse_tunneled_target("/v1/../admin", "api.example.com", TUNNEL)


# --- ClientHello ---------------------------------------------------------------------------


def client_hello(server_name: str | None) -> bytes:
    """A real ClientHello from Python's ssl module, captured through memory BIOs."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    if server_name is None:
        context.check_hostname = False
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_the_sni_of_a_real_client_hello_is_read() -> None:
    record = client_hello("API.Example.com")
    assert looks_like_tls(record)
    assert record_length(record) == len(record)
    assert parse_client_hello(record).server_name == "api.example.com"


def test_a_client_hello_without_sni_has_no_server_name() -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    assert parse_client_hello(outgoing.read()).server_name is None


@pytest.mark.parametrize("cut", [3, 10, 60, -1])
def test_truncated_or_garbage_hellos_are_refused(cut: int) -> None:
    record = client_hello("api.example.com")
    with pytest.raises(ClientHelloError):
        parse_client_hello(record[:cut])
    assert not looks_like_tls(b"GET / HTTP/1.1")
    with pytest.raises(ClientHelloError):
        parse_client_hello(b"\x17\x03\x03\x00\x01\x00")
