"""Where the caller's target rules meet aiohttp: each hop's URL, DNS answers and sockets.

Three checks, all applying one `TargetGuard`:
- `check_url` on every hop's URL, before any network: scheme, `CALLER_ALLOWED_HOSTS`, and
  numeric hosts (aiohttp connects those without asking the resolver);
- `GuardedResolver` on every DNS answer, so a name is connected only through addresses that
  were checked (a rebinding DNS server cannot swap them between check and connect);
- `socket_factory` on the address of every socket aiohttp opens: the last word, whatever
  path the address took.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from ipaddress import ip_address

from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from microapp.services.caller.addresses import AddressRule, IPAddress, numeric_host_address

# What aiohttp hands its socket factory: (family, type, proto, canonname, sockaddr).
AddrInfo = tuple[int, int, int, str, tuple[object, ...]]

_HOW_TO_ALLOW = "set CALLER_ALLOW_PRIVATE_NETWORKS=1 to allow private targets"


class TargetRefused(Exception):
    """The target is not one the caller may reach (its address or host is refused).

    Deliberately not an OSError, so aiohttp lets it through unwrapped.
    """


@dataclass(frozen=True)
class TargetGuard:
    """The rules every hop must pass: an address rule (None: any) and a host allowlist."""

    address_rule: AddressRule | None
    allowed_hosts: frozenset[str] = field(default_factory=frozenset[str])

    @classmethod
    def of(cls, address_rule: AddressRule | None, allowed_hosts: Collection[str]) -> TargetGuard:
        """A guard with the allowlist lower-cased, as hosts are compared."""
        return cls(address_rule, frozenset(h.lower() for h in allowed_hosts))

    def check_url(self, url: URL) -> None:
        """Refuse a hop's URL by its scheme, its host or the address its numeric host is."""
        host = url.raw_host
        if url.scheme not in {"http", "https"} or not host:
            raise TargetRefused(f"{url} is not an absolute http(s) URL")
        if self.allowed_hosts and host.lower() not in self.allowed_hosts:
            raise TargetRefused(f"host {host!r} is not in CALLER_ALLOWED_HOSTS")
        address = numeric_host_address(host)
        if address is not None:
            shown = host if str(address) == host else f"{host} ({address})"
            self.check_address(address, shown)

    def check_address(self, address: IPAddress, target: str) -> None:
        """Refuse `address` (reached as `target`) when the rule says so."""
        if self.address_rule is None:
            return
        rule = self.address_rule(address)
        if rule is not None:
            raise TargetRefused(f"target {target} is {rule}; {_HOW_TO_ALLOW}")


class GuardedResolver(AbstractResolver):
    """A resolver that refuses a name when any address it resolves to is refused."""

    def __init__(self, inner: AbstractResolver, guard: TargetGuard) -> None:
        self._inner = inner
        self._guard = guard

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            address = _parse(result["host"])
            self._guard.check_address(address, f"{host} resolves to {address}, which")
        return results

    async def close(self) -> None:
        await self._inner.close()


def guarded_socket_factory(guard: TargetGuard) -> Callable[[AddrInfo], socket.socket]:
    """An aiohttp `socket_factory` that refuses to open a socket to a refused address."""

    def create(addr_info: AddrInfo) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        address = _parse(str(sockaddr[0]))
        guard.check_address(address, str(address))
        return socket.socket(family, type_, proto)

    return create


def _parse(text: str) -> IPAddress:
    try:
        return ip_address(text)
    except ValueError:
        # Anything that is not a plain address cannot be checked, so it is not connected.
        raise TargetRefused(f"target address {text!r} is not an IP address") from None
