"""Which IP addresses the caller may connect to: pure functions, no network.

By default only public unicast addresses are allowed; anything that reaches this machine,
its private networks or the cloud's metadata service is refused with the name of the rule.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

IPAddress = IPv4Address | IPv6Address

# Given an address, the name of the rule that refuses it, or None when it may be connected.
AddressRule = Callable[[IPAddress], str | None]

_RFC1918 = (
    IPv4Network("10.0.0.0/8"),
    IPv4Network("172.16.0.0/12"),
    IPv4Network("192.168.0.0/16"),
)
# RFC 6598; Python's ipaddress calls it neither private nor global.
_SHARED = IPv4Network("100.64.0.0/10")
_UNIQUE_LOCAL = IPv6Network("fc00::/7")
_NAT64_WELL_KNOWN = IPv6Network("64:ff9b::/96")
# RFC 8215: a NAT64 prefix for one operator's own network, never a public target.
_NAT64_LOCAL_USE = IPv6Network("64:ff9b:1::/48")


def embedded_ipv4(address: IPv6Address) -> IPv4Address | None:
    """The IPv4 host an IPv6 address leads to: IPv4-mapped, 6to4 or well-known NAT64."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64_WELL_KNOWN:
        return IPv4Address(int(address) & 0xFFFF_FFFF)
    return None


def non_public_rule(address: IPAddress) -> str | None:
    """The rule that refuses `address` (e.g. "loopback"), or None for public unicast."""
    if isinstance(address, IPv6Address):
        inner = embedded_ipv4(address)
        if inner is not None:
            # What is reached is the IPv4 host, so its rule is the one that counts.
            return non_public_rule(inner)
        if address in _NAT64_LOCAL_USE:
            return "private"
    # Order matters: the most specific name first (169.254.0.0/16 is also "private").
    checks: list[tuple[bool, str]] = [
        (address.is_unspecified, "unspecified"),
        (address.is_loopback, "loopback"),
        (address.is_link_local, "link-local"),
        (address.is_multicast, "multicast"),
        (isinstance(address, IPv4Address) and any(address in n for n in _RFC1918), "private"),
        (isinstance(address, IPv4Address) and address in _SHARED, "shared (carrier-grade NAT)"),
        (isinstance(address, IPv6Address) and address in _UNIQUE_LOCAL, "unique-local"),
        (isinstance(address, IPv6Address) and address.is_site_local, "site-local"),
        (address.is_reserved, "reserved"),
        # Documentation, benchmarking, 0.0.0.0/8 and the other special-purpose ranges.
        (not address.is_global, "special-purpose (not globally routable)"),
    ]
    return next((name for refused, name in checks if refused), None)


def numeric_host_address(host: str) -> IPAddress | None:
    """The address a numeric host stands for, or None for a name.

    Accepts every form the C library turns into an address without DNS, such as
    `127.1`, `0x7f.1`, `017700000001` and `2130706433`, and bracketed IPv6 literals.
    """
    text = host.removeprefix("[").removesuffix("]")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if not text or not all(c.isalnum() or c == "." for c in text):
        return None
    try:
        # inet_aton parses text only (no lookup): the legacy forms getaddrinfo accepts too.
        return IPv4Address(socket.inet_aton(text))
    except OSError:
        return None
