"""Who is really on the other end, when a proxy stands in between.

`X-Forwarded-For/-Proto/-Host` are just headers: anyone can send them. They are believed only
when the TCP peer is one of `TRUSTED_PROXIES`; otherwise the peer address and the request's own
URL are the truth. Both the signature check (which URL did Twilio sign?) and per-client limits
(whose login attempts are these?) go through here, so they agree.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from starlette.datastructures import URL, Headers

__all__ = ["TrustedProxies", "client_ip", "forwarded_base"]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class TrustedProxies:
    """A set of proxy networks; `in` tells whether a peer address belongs to one of them."""

    __slots__ = ("_networks",)

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self._networks: tuple[_Network, ...] = tuple(
            ipaddress.ip_network(entry, strict=False) for entry in entries
        )

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str) or not self._networks:
            return False
        try:
            ip = ipaddress.ip_address(address.strip().strip("[]"))
        except ValueError:
            return False
        return any(ip in net for net in self._networks)


def _first(headers: Headers, name: str) -> str:
    return headers.get(name, "").split(",")[0].strip()


def client_ip(peer: str | None, headers: Headers, trusted: TrustedProxies) -> str:
    """The client's address: the peer, or, through trusted proxies, the nearest untrusted hop.

    X-Forwarded-For is read right to left (each proxy appends the address it saw), skipping
    trusted proxies, so a client cannot choose its own address by sending the header itself.
    """
    address = peer or "unknown"
    if address not in trusted:
        return address
    hops: Sequence[str] = [
        h.strip() for h in ",".join(headers.getlist("x-forwarded-for")).split(",") if h.strip()
    ]
    for hop in reversed(hops):
        if hop not in trusted:
            return hop
        address = hop
    return address


def forwarded_base(
    url: URL, headers: Headers, peer: str | None, trusted: TrustedProxies
) -> str | None:
    """scheme://host as the client asked for it, from a trusted proxy's headers; else None."""
    if peer not in trusted:
        return None
    proto = _first(headers, "x-forwarded-proto").lower()
    host = _first(headers, "x-forwarded-host")
    if not proto and not host:
        return None
    if not proto:
        proto = {"ws": "http", "wss": "https"}.get(url.scheme, url.scheme)
    proto = {"ws": "http", "wss": "https"}.get(proto, proto)
    if proto not in ("http", "https"):
        return None
    return f"{proto}://{host or headers.get('host', '') or url.netloc}"
