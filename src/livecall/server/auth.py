"""Who may ask what of this server: Host names, "local" requests, and the bearer tokens.

One module for every access rule that is not a carrier's signature (those live with each
carrier) or the dashboard's session cookies (`server.dashboard.auth`):

- `HostPolicy` and `LocalAccess` below (DNS rebinding, local-only mode);
- `is_loopback_host`: may `serve --insecure-dev` bind there;
- `bearer_auth` (the read API, `LIVECALL_API_TOKEN` or local-only), `calls_auth` (placing
  calls, `LIVECALL_CALLS_TOKEN` only) and `admin_auth` (`/admin`, `ADMIN_TOKEN` or the
  admin socket, never a browser): FastAPI dependencies, tokens compared in constant time.

Which Host names are ours, and which requests count as "local":

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

# No `from __future__ import annotations`: FastAPI reads the dependencies' `Annotated[...,
# Depends(bearer)]` at run time, and `bearer` is a closure variable no string can name.
import hmac
import ipaddress
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Annotated, Any
from urllib.parse import urlsplit

import structlog
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from livecall.server.forwarded import TrustedProxies
from livecall.settings import Settings

__all__ = [
    "LOOPBACK_NAMES",
    "ApiDisabled",
    "HostPolicy",
    "LocalAccess",
    "admin_auth",
    "bearer_auth",
    "calls_auth",
    "host_name",
    "is_loopback_host",
    "on_admin_socket",
    "peer_of",
    "unix_socket_of",
]

log = structlog.get_logger("livecall.auth")

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


def is_loopback_host(host: str | None) -> bool:
    """A bind address or host name on this machine only (`localhost`, 127/8, ::1)."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0]).is_loopback
    except ValueError:
        return False


# --- bearer tokens --------------------------------------------------------------------------


class ApiDisabled(RuntimeError):
    """No `LIVECALL_API_TOKEN` and not local-only: the app should not mount the API."""


def _unauthorized() -> HTTPException:
    return HTTPException(
        401, "invalid or missing bearer token", headers={"WWW-Authenticate": "Bearer"}
    )


def admin_socket_of(settings: Settings) -> str | None:
    """`ADMIN_SOCKET` as the path string ASGI scopes carry, or None."""
    return str(settings.admin_socket) if settings.admin_socket is not None else None


def bearer_auth(settings: Settings) -> Callable[..., Awaitable[None]]:
    """The API's auth dependency (every `/api` router uses it); raises `ApiDisabled`."""
    token = settings.api_token.get_secret_value() if settings.api_token is not None else ""
    if not token and not settings.api_local_only:
        raise ApiDisabled(
            "LIVECALL_API_TOKEN is not set: the call records API is off "
            "(set a token, or LIVECALL_API_LOCAL_ONLY=true to serve loopback clients only)"
        )
    expected = token.encode()
    bearer = HTTPBearer(auto_error=False, description="LIVECALL_API_TOKEN")
    local = LocalAccess(TrustedProxies(settings.trusted_proxies), admin_socket_of(settings))

    async def authorize(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        if expected:
            given = credentials.credentials.encode() if credentials is not None else b""
            if credentials is None or not hmac.compare_digest(given, expected):
                raise _unauthorized()
            return
        if not local.is_local(request.scope, request.headers):  # Host, Origin, real peer
            raise HTTPException(403, "the call records API is local-only")

    return authorize


def calls_auth(settings: Settings) -> Callable[..., Awaitable[None]]:
    """Auth for placing calls: `Authorization: Bearer <LIVECALL_CALLS_TOKEN>` and nothing else.

    Placing calls costs money: never the read token (also the dashboard password), never a
    loopback client without a token. Unset, no one may place calls (403 saying what to set);
    the read token gets a 403 that says it only reads, any other a 401.
    """
    calls = settings.calls_token.get_secret_value().encode() if settings.calls_token else b""
    read = settings.api_token.get_secret_value().encode() if settings.api_token else b""
    bearer = HTTPBearer(auto_error=False, description="LIVECALL_CALLS_TOKEN")

    async def authorize(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        given = credentials.credentials.encode() if credentials is not None else b""
        if calls and hmac.compare_digest(given, calls):
            return
        client = request.client.host if request.client is not None else None
        if not calls:
            log.warning("api.calls_refused", reason="no LIVECALL_CALLS_TOKEN", client=client)
            raise HTTPException(
                403,
                "placing calls is off: set LIVECALL_CALLS_TOKEN "
                "(LIVECALL_API_TOKEN only reads call records)",
            )
        if read and hmac.compare_digest(given, read):
            log.warning("api.calls_refused", reason="read token", client=client)
            raise HTTPException(
                403, "this token only reads call records: placing calls needs LIVECALL_CALLS_TOKEN"
            )
        log.warning("api.calls_refused", reason="bad token", client=client)
        raise _unauthorized()

    return authorize


def admin_auth(settings: Settings) -> Callable[[Request], None]:
    """`/admin`: ADMIN_TOKEN as a bearer token, or the admin Unix socket; never a browser.

    Being on loopback is not enough: a sidecar, a local proxy or a DNS-rebinding web page is
    on loopback too.
    """
    token = settings.admin_token
    expected = token.get_secret_value().encode() if token is not None else b""
    admin_socket = admin_socket_of(settings)

    def admin(request: Request) -> None:
        if "origin" in request.headers:
            raise HTTPException(403, "/admin is not for browsers")
        if on_admin_socket(request.scope, admin_socket):
            return
        if not expected:
            raise HTTPException(403, "set ADMIN_TOKEN (or ADMIN_SOCKET) to use /admin")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), expected):
            raise _unauthorized()

    return admin
