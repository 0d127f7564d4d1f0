"""Signing in: signed session cookies, CSRF tokens, same-origin checks and the login throttle
(the login and logout handlers that use them: `dashboard.login`).

One login with `LIVECALL_API_TOKEN` gives an HMAC-signed session cookie (HttpOnly,
SameSite=Strict, Secure over https) that never contains the token. State-changing requests
also need a CSRF token bound to the session and a same-origin `Origin`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import structlog

from livecall.server.urls import public_base

log = structlog.get_logger("livecall.dashboard")

SESSION_COOKIE = "livecall_session"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
DEFAULT_SESSION_TTL_S = 12 * 3600.0


@dataclass(frozen=True, slots=True)
class Session:
    """A checked session: its random id (binds the CSRF token) and when it was issued."""

    id: str
    issued: int


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


class Sessions:
    """Stateless signed sessions: `issued.id.signature`, HMAC-SHA256 under a derived key.

    The key is derived from the API token, so sessions survive restarts and work across
    processes, and changing the token signs everyone out. The cookie never holds the token.
    Logout revokes the session id in this process (a stolen cookie still dies at its TTL).
    """

    def __init__(
        self,
        key: bytes,
        ttl_s: float = DEFAULT_SESSION_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = key
        self.ttl_s = ttl_s
        self._clock = clock
        self._revoked: dict[str, float] = {}

    @classmethod
    def for_token(cls, token: str | None, ttl_s: float = DEFAULT_SESSION_TTL_S) -> Sessions:
        """Key from the token; without one (local-only), a random key: sessions end at restart."""
        if token:
            key = hmac.new(token.encode(), b"livecall dashboard session key v1", "sha256").digest()
        else:
            key = secrets.token_bytes(32)
        return cls(key, ttl_s)

    def _sign(self, purpose: str, *parts: str) -> str:
        message = "|".join((purpose, *parts)).encode()
        return _b64(hmac.new(self._key, message, hashlib.sha256).digest())

    def issue(self) -> str:
        issued = str(int(self._clock()))
        sid = secrets.token_urlsafe(18)
        return f"{issued}.{sid}.{self._sign('session', issued, sid)}"

    def check(self, value: str | None) -> Session | None:
        if not value or len(value) > 200:
            return None
        parts = value.split(".")
        if len(parts) != 3 or not parts[0].isdigit():
            return None
        issued_s, sid, signature = parts
        if not hmac.compare_digest(
            signature.encode(), self._sign("session", issued_s, sid).encode()
        ):
            return None
        issued, now = int(issued_s), self._clock()
        if issued > now + 60 or now - issued > self.ttl_s or sid in self._revoked:
            return None
        return Session(sid, issued)

    def revoke(self, session: Session) -> None:
        now = self._clock()
        self._revoked = {s: t for s, t in self._revoked.items() if t > now}
        self._revoked[session.id] = session.issued + self.ttl_s

    def csrf_token(self, session: Session) -> str:
        return self._sign("csrf", session.id)

    def check_csrf(self, session: Session, token: str | None) -> bool:
        if not token:
            return False
        return hmac.compare_digest(token.encode(), self.csrf_token(session).encode())


class LoginThrottle:
    """Slows down token guessing: `limit` failed logins per client within `window_s`.

    Clients are told apart by address as seen through trusted proxies (`client_key`), so one
    guesser neither shares a bucket with everyone behind the same proxy nor escapes by
    sending X-Forwarded-For itself; at most `max_clients` buckets are kept.
    """

    def __init__(
        self,
        limit: int = 10,
        window_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = 10_000,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self.max_clients = max_clients
        self._failures: dict[str, list[float]] = {}

    @staticmethod
    def client_key(address: str) -> str:
        """An IPv4 address, or an IPv6 address's /64 (one host commonly holds a whole /64)."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return address[:64]
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
        return str(ip)

    def _recent(self, client: str) -> list[float]:
        cutoff = self._clock() - self.window_s
        recent = [t for t in self._failures.get(client, ()) if t > cutoff]
        if recent:
            self._failures[client] = recent
        else:
            self._failures.pop(client, None)
        return recent

    def blocked(self, client: str) -> bool:
        return len(self._recent(client)) >= self.limit

    def failed(self, client: str) -> None:
        while len(self._failures) >= self.max_clients:  # a flood of sources: forget the oldest
            self._failures.pop(next(iter(self._failures)))
        self._recent(client)
        self._failures.setdefault(client, []).append(self._clock())

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)


# --- small helpers --------------------------------------------------------------------------


def client_label(host: Any) -> str:
    return getattr(host, "host", None) or "unknown"


def safe_next(target: str | None) -> str:
    """Only a local path: never an open redirect to another site."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/"
    return target


def is_https(url: Any, headers: Mapping[str, str]) -> bool:
    proto = headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return proto == "https" or url.scheme in ("https", "wss")


def _origins(url: Any, headers: Any, public_url: str | None) -> set[str]:
    """The origins this server is reached at: as the request says, and `PUBLIC_URL`."""
    allowed = {public_base(url, headers, None).lower()}
    if public_url:
        allowed.add(public_base(url, headers, public_url).lower())
    return allowed


def same_origin(url: Any, headers: Any, public_url: str | None, *, required: bool) -> bool:
    """A browser names the page's origin; a cross-site page cannot pretend to be us."""
    origin = headers.get("origin")
    if origin is None or origin == "null":
        return not required and origin is None
    return origin.rstrip("/").lower() in _origins(url, headers, public_url)
