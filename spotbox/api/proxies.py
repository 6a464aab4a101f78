"""The client's address behind a reverse proxy: `--trusted-proxies` and X-Forwarded-For.

Login penalties are per address (spotbox/mqtt/auth.py), and so is the loopback-only anonymous mode. Behind a proxy
every request comes from the proxy's address: one client's wrong passwords slowed every robot's login through it,
and a proxy on this machine made every client look local. A request whose TCP peer is a trusted proxy is taken to
come from the address its X-Forwarded-For names: walking the header from the right (each proxy appends the peer it
saw), the first address that is not itself a trusted proxy. Only what trusted proxies appended is believed: a client
may send any X-Forwarded-For it likes, and what it wrote stays on the left. A request from any other peer is taken
at its TCP address, whatever its headers say.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware

from spotbox.api.errors import Handler

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Sequence[str]) -> tuple[Network, ...]:
    """Each `--trusted-proxies` value as a network (an address alone is a network of one); raises ValueError.

    An IPv4-mapped IPv6 value (`::ffff:10.0.0.5`, as dual-stack logs show addresses) is its IPv4 network: peers are
    compared as IPv4.
    """
    networks: list[Network] = []
    for value in values:
        network = ipaddress.ip_network(value.strip(), strict=False)
        mapped = network.network_address.ipv4_mapped if isinstance(network, ipaddress.IPv6Network) else None
        if mapped is not None and network.prefixlen >= 96:
            network = ipaddress.IPv4Network((mapped, network.prefixlen - 96))
        networks.append(network)
    return tuple(networks)


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(text: str) -> Address | None:
    """An X-Forwarded-For entry or a peer as an address, without a port (`1.2.3.4:80`, `[2001:db8::1]:443`) or an
    IPv6 zone, an IPv4-mapped one as IPv4; None when it is none."""
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        ip = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_address(peer: str | None, forwarded_for: Sequence[str], trusted: tuple[Network, ...]) -> str | None:
    """The client's address: `peer` unless it is a trusted proxy, then what the proxies' X-Forwarded-For headers
    (`forwarded_for`, in the order received) name, read from the right past every trusted proxy, as plain text.

    An entry that is not an IP address ends the walk at the proxy that passed it: it is not believed. So does a
    loopback address named by a proxy that is not on this machine: that client is on the proxy's host, not here
    (the loopback-only anonymous mode must not take it for local).
    """
    if peer is None or not trusted:
        return peer
    current = _address(peer)
    if current is None:
        return peer
    hops = [hop for header in forwarded_for for hop in header.split(",")]
    for hop in reversed(hops):
        if not any(current in network for network in trusted):
            break
        named = _address(hop)
        if named is None or (named.is_loopback and not current.is_loopback):
            break
        current = named
    return str(current)


def proxy_middleware(trusted: tuple[Network, ...]) -> Middleware:
    """A middleware giving each request from a trusted proxy the client's address as `request.remote`."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        forwarded_for = request.headers.getall(hdrs.X_FORWARDED_FOR, [])
        if forwarded_for:
            address = client_address(request.remote, forwarded_for, trusted)
            if address is not None and address != request.remote:
                request = request.clone(remote=address)
        return await handler(request)

    return middleware
