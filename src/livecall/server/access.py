"""Which Host names are ours, and which requests count as "local".

DNS rebinding: a web page on evil.example whose name is made to resolve to 127.0.0.1 has the
browser talk to a livecall on the user's machine as if it were evil.example, reading the
answers. Such requests carry `Host: evil.example` (and, for writes, `Origin:
http://evil.example`), so:

- `HostPolicy`: every request must name a Host we serve: `PUBLIC_URL`'s, `ALLOWED_HOSTS`,
  `localhost`, or an IP address (probes and scrapers use the pod IP, sidecars and NAT change
  which one). None of these can be chosen by a rebinding page: its requests name the
  attacker's domain; a page that names an IP was loaded from that IP. With neither
  `PUBLIC_URL` nor `ALLOWED_HOSTS` set the check is off (a warning at startup); the
  local-trust rule below holds regardless.
- `LocalAccess`: "loopback means trusted" (`LIVECALL_API_LOCAL_ONLY`) only for a request whose
  real TCP peer is 127.0.0.1 or ::1 exactly (a sidecar such as Istio's comes from 127.0.0.6),
  that is not listed in `TRUSTED_PROXIES`, carries no forwarding header (a proxy that announces
  itself), names a loopback Host and, if it has an Origin, a loopback origin. A TCP proxy on
  the same host that forwards outside traffic from 127.0.0.1 without saying so cannot be told
  apart: list it in `TRUSTED_PROXIES`, or do not use local-only mode there. The admin Unix
  socket (`ADMIN_SOCKET`, mode 0600) is local by construction; any other Unix socket (a
  proxy in front of `uvicorn --uds`) is not.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from livecall.server.forwarded import TrustedProxies

__all__ = [
    "LOOPBACK_NAMES",
    "HostPolicy",
    "LocalAccess",
    "host_name",
    "on_admin_socket",
    "peer_of",
    "unix_socket_of",
]

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_LOOPBACK_PEERS = frozenset({"127.0.0.1", "::1", "::ffff:127.0.0.1"})
FORWARDING_HEADERS = (
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "via",
)


def host_name(value: str) -> str:
    """The name in a Host header or URL netloc: lower case, no port, no IPv6 brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else ""
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def unix_socket_of(scope: Mapping[str, Any]) -> str | None:
    """The path of the Unix socket a connection came in on (uvicorn gives no client and a
    server port of None), or None for TCP."""
    server = scope.get("server")
    if scope.get("client") is None and server is not None and server[1] is None:
        return str(server[0])
    return None


def on_admin_socket(scope: Mapping[str, Any], admin_socket: str | None) -> bool:
    """Did the connection come in on `ADMIN_SOCKET` (and not some other Unix socket)?"""
    return admin_socket is not None and unix_socket_of(scope) == admin_socket


def peer_of(scope: Mapping[str, Any]) -> str | None:
    client = scope.get("client")
    return client[0] if client else None


class HostPolicy:
    """The Host names this server answers for (see the module doc)."""

    def __init__(
        self,
        public_url: str | None,
        allowed_hosts: Iterable[str] = (),
        trusted: TrustedProxies | None = None,
        admin_socket: str | None = None,
    ) -> None:
        self.trusted = trusted or TrustedProxies()
        self.admin_socket = admin_socket
        names: set[str] = set()
        suffixes: list[str] = []
        self.any = False
        if public_url:
            names.add(host_name(urlsplit(public_url).netloc))
        for entry in allowed_hosts:
            entry = entry.strip().lower()
            if entry == "*":
                self.any = True
            elif entry.startswith("*."):
                suffixes.append(entry[1:])  # ".example.com"
            elif entry:
                names.add(host_name(entry))
        self.names = frozenset(names)
        self.suffixes = tuple(suffixes)
        self.active = not self.any and bool(self.names or self.suffixes)

    def _named(self, name: str) -> bool:
        return name in self.names or (bool(self.suffixes) and name.endswith(self.suffixes))

    def allows(self, scope: Mapping[str, Any], headers: Mapping[str, str]) -> bool:
        if not self.active or on_admin_socket(scope, self.admin_socket):
            return True
        forwarded = headers.get("x-forwarded-host")
        if forwarded and peer_of(scope) in self.trusted:
            name = host_name(forwarded.split(",")[0])
        else:
            name = host_name(headers.get("host", ""))
        if not name:
            return False
        if name in LOOPBACK_NAMES or self._named(name):
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True


def _loopback_origin(origin: str) -> bool:
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and host_name(parts.netloc) in LOOPBACK_NAMES


class LocalAccess:
    """Does a request come from this machine, not through a proxy, not from a web page
    elsewhere? (See the module doc for what is checked and why.)"""

    def __init__(
        self, trusted: TrustedProxies | None = None, admin_socket: str | None = None
    ) -> None:
        self.trusted = trusted or TrustedProxies()
        self.admin_socket = admin_socket

    def is_local(self, scope: Mapping[str, Any], headers: Mapping[str, str]) -> bool:
        if on_admin_socket(scope, self.admin_socket):
            return True
        peer = peer_of(scope)
        if peer not in _LOOPBACK_PEERS or peer in self.trusted:
            return False
        if any(name in headers for name in FORWARDING_HEADERS):
            return False
        if host_name(headers.get("host", "")) not in LOOPBACK_NAMES:
            return False
        origin = headers.get("origin")
        return origin is None or _loopback_origin(origin)
