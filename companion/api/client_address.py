"""The client address that per-address limits count: one switch, TRUST_FORWARDED_FOR.

Off (the default): the TCP peer, whatever any header says. On: `X-Forwarded-For` is read only when
the peer is one of TRUSTED_PROXIES, walked from the right past the trusted proxies; the first entry
that is not a trusted proxy is the client (entries further left were written by the client and may
be forged: taking the first would let anyone pick a fresh address, and a fresh budget, per request).

`companion serve` runs uvicorn with its own proxy-header handling off, so nothing rewrites the peer
before this is consulted (uvicorn's default trusts 127.0.0.1, and FORWARDED_ALLOW_IPS=* trusts all).
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=8)
def parse_networks(value: str) -> tuple[Network, ...]:
    """`"127.0.0.1, 10.0.0.0/8, ::1"` as networks. Raises ValueError for a bad entry."""
    return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in value.split(",") if item.strip())


def _trusted(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_address(peer: str | None, forwarded_for: str | None, *, trust: bool, proxies: str) -> str:
    """The address to count for a request from `peer` carrying `forwarded_for` (X-Forwarded-For)."""
    peer = peer or "unknown"
    if not trust or not forwarded_for:
        return peer
    networks = parse_networks(proxies)
    if not _trusted(peer, networks):
        return peer  # not through our proxy: the header is the client's own word
    hops = [hop.strip() for hop in forwarded_for.split(",")]
    for hop in reversed(hops):
        if hop and not _trusted(hop, networks):
            return hop[:64]
    # Every hop is a trusted proxy (a request from the proxy's own network): the left-most one.
    return next((hop[:64] for hop in hops if hop), peer)
