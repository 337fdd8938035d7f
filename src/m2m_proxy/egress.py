"""Egress policy: where requests that no route names (``unmatched: passthrough``) and
blind tunnels may connect.

Never to a non-global address: loopback, private (RFC 1918, ULA), link-local (cloud
metadata at 169.254.169.254 and fd00:ec2::254), CGNAT, multicast, unspecified or
reserved ranges, nor the metadata host names, unless ``proxy.allow_destinations``
names them. Routes are trusted: a route names its destination on purpose.

The check runs on the address actually connected to: names are resolved here (or by
:class:`FilteringResolver` inside aiohttp) and only permitted addresses are used, so a
DNS answer that changes between check and connect (rebinding) cannot get around it.
IPv4-mapped, NAT64 and 6to4 IPv6 addresses are judged by the IPv4 address inside;
decimal, hex and short IPv4 forms (``2130706433``, ``0x7f.1``) resolve to the address
they mean before the check.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from m2m_proxy.authority import normalize_host
from m2m_proxy.config import ProxySettings
from m2m_proxy.errors import DestinationDeniedError, LoopDetectedError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
METADATA_HOSTS = frozenset(
    {"metadata.google.internal", "metadata.goog", "metadata", "instance-data"}
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_6TO4 = ipaddress.ip_network("2002::/16")


class DestinationBlockedError(OSError):
    """Raised inside aiohttp's resolver: the name only resolves to forbidden addresses."""


def embedded_ipv4(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 address carries (mapped, NAT64, 6to4), else itself."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if address.sixtofour is not None:
            return address.sixtofour
    return address


def literal_address(host: str) -> IPAddress | None:
    """The address an IP-literal host means, including the forms inet_aton accepts and
    URL parsers may turn into a dotted quad (``2130706433``, ``0x7f.1``, ``127.1``)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if host and all(c in "0123456789abcdefxABCDEFX." for c in host) and host[0].isdigit():
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


class EgressPolicy:
    def __init__(self, settings: ProxySettings, own: Iterable[tuple[str, int]] = ()) -> None:
        self._networks = settings.allow_destinations
        self._hosts = settings.allow_destination_hosts
        self._own: set[tuple[str, int]] = set()
        self._wildcard_ports: set[int] = set()
        self.set_own(own)

    def set_own(self, own: Iterable[tuple[str, int]]) -> None:
        """The proxy's own listening addresses (a connection there would loop)."""
        self._own = {(normalize_host(host), port) for host, port in own}
        self._wildcard_ports = {port for host, port in self._own if host in ("0.0.0.0", "::")}

    def permits_host(self, host: str) -> bool:
        return host in self._hosts

    def permits(self, address: IPAddress) -> bool:
        inner = embedded_ipv4(address)
        if inner.is_global and not inner.is_multicast:
            return True
        return any(inner in network or address in network for network in self._networks)

    def check_literal(self, host: str, port: int) -> None:
        """For an IP-literal (or metadata-name) target: raise unless permitted."""
        self._check_loop(host, port)
        if host in METADATA_HOSTS and host not in self._hosts:
            raise DestinationDeniedError(f"'{host}' is a cloud metadata service")
        address = literal_address(host)
        if address is not None and not self.permits(address):
            raise DestinationDeniedError(_denied(str(address)))

    async def resolve(self, host: str, port: int) -> str:
        """An address of ``host`` that may be connected to; raises DestinationDeniedError
        (only forbidden addresses) or OSError (the name does not resolve)."""
        self.check_literal(host, port)
        if self.permits_host(host):
            return host
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [str(info[4][0]) for info in infos]
        for address in addresses:
            self._check_loop(address, port)
            if self.permits(ipaddress.ip_address(address.partition("%")[0])):
                return address
        raise DestinationDeniedError(_denied(addresses[0] if addresses else host))

    def _check_loop(self, host: str, port: int) -> None:
        host = normalize_host(host)
        if (host, port) in self._own or (
            port in self._wildcard_ports and host in ("localhost", "127.0.0.1", "::1")
        ):
            raise LoopDetectedError("the destination is this proxy's own listener")


class FilteringResolver(AbstractResolver):
    """aiohttp resolver that drops forbidden addresses (for the passthrough session)."""

    def __init__(self, policy: EgressPolicy) -> None:
        self._policy = policy
        self._inner = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self._policy.permits_host(normalize_host(host)):
            return await self._inner.resolve(host, port, family)
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if self._policy.permits(ipaddress.ip_address(r["host"]))]
        if not allowed:
            raise DestinationBlockedError(_denied(results[0]["host"] if results else host))
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def _denied(address: str) -> str:
    return (
        f"the destination resolves to {address}, a private, loopback, link-local or "
        "metadata address; add it to proxy.allow_destinations or route the host"
    )
