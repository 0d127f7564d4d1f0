"""Who is calling: Exotel signs nothing, so trust rides in the URLs livecall hands out.

Exotel documents no signature on its HTTP requests (dynamic applet URLs, Passthru,
StatusCallback) and none on the stream. What it offers is what you put in the URL: HTTP
Basic credentials (`wss://user:secret@host/...`, sent as `Authorization: Basic ...`) and
query parameters, plus an IP allowlist arranged with Exotel. livecall therefore checks:

- **`ExotelUrlAuth`**: the applet endpoint URL configured in the Exotel flow carries a
  shared secret, as Basic credentials or as a `key` query parameter; every request must
  present it (constant-time comparison). There is no timestamp, so no replay window: the
  secret is a static bearer credential (HTTPS only; pair it with Exotel's IP allowlist).
- **`StreamTokens`**: the stream URL livecall answers with carries a per-call token, an
  HMAC over the call's id and an expiry. The WebSocket upgrade is refused unless the token
  is valid and unexpired, and the `start` frame must name the call the token was minted
  for, so a token seen once can neither open a stream after its expiry nor be moved to
  another call.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Mapping
from urllib.parse import parse_qsl, urlsplit

__all__ = ["DEFAULT_TOKEN_TTL_S", "URL_KEY_PARAM", "ExotelUrlAuth", "StreamTokens"]

URL_KEY_PARAM = "key"
_SID_OK = re.compile(r"[A-Za-z0-9_-]{1,64}")
DEFAULT_TOKEN_TTL_S = 120  # the applet's URL request, then the upgrade (with one retry)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    lower = name.lower()
    for key, value in headers.items():
        if key.lower() == lower:
            return value
    return None


class ExotelUrlAuth:
    """Checks the shared secret the configured Exotel URL carries (Basic auth or `?key=`)."""

    __slots__ = ("_secret", "_username")

    def __init__(self, secret: str, *, username: str = "exotel") -> None:
        if not isinstance(secret, str) or len(secret) < 16:
            raise ValueError("the Exotel URL secret must be a string of at least 16 characters")
        self._secret = secret.encode()
        self._username = username.encode()

    def __repr__(self) -> str:
        return "ExotelUrlAuth(secret=<redacted>)"

    def _equal(self, given: str | bytes) -> bool:
        data = given.encode() if isinstance(given, str) else given
        return hmac.compare_digest(data, self._secret)

    def verify(self, url: str, headers: Mapping[str, str]) -> bool:
        """True if the request carries the secret: `Authorization: Basic` or `?key=`."""
        auth = _header(headers, "authorization")
        if auth is not None:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() != "basic":
                return False
            try:
                decoded = base64.b64decode(value.strip(), validate=True)
            except (binascii.Error, ValueError):
                return False
            user, sep, password = decoded.partition(b":")
            return bool(sep) and hmac.compare_digest(user, self._username) & self._equal(password)
        keys = [v for k, v in parse_qsl(urlsplit(url).query) if k == URL_KEY_PARAM]
        return len(keys) == 1 and self._equal(keys[0])

    def basic_header(self) -> str:
        """The Authorization header Exotel sends for credentials in the URL (simulator use)."""
        raw = self._username + b":" + self._secret
        return "Basic " + base64.b64encode(raw).decode("ascii")


class StreamTokens:
    """Per-call stream tokens: `<expiry>.<call id>.<mac>`, MAC = HMAC-SHA256(expiry, call id).

    The call's id is inside, so the WebSocket upgrade (which knows no call yet) checks the
    token whole, and `start` must then name the same call. `clock` is injectable for tests;
    a token made by one process checks in any other that shares the secret (no state).
    """

    __slots__ = ("_clock", "_key", "ttl_s")

    def __init__(
        self,
        secret: str,
        *,
        ttl_s: int = DEFAULT_TOKEN_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(secret, str) or len(secret) < 16:
            raise ValueError("the stream token secret must be a string of at least 16 characters")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self._key = hashlib.sha256(b"livecall-exotel-stream\0" + secret.encode()).digest()
        self.ttl_s = ttl_s
        self._clock = clock

    def __repr__(self) -> str:
        return f"StreamTokens(ttl_s={self.ttl_s}, secret=<redacted>)"

    def _mac(self, expiry: str, call_sid: str) -> str:
        msg = f"{expiry}\0{call_sid}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:32]

    def mint(self, call_sid: str) -> str:
        """A token for this call, good for `ttl_s` seconds."""
        if not call_sid or not _SID_OK.fullmatch(call_sid):
            raise ValueError("a stream token needs the call's id (letters, digits, - and _)")
        expiry = str(int(self._clock()) + self.ttl_s)
        return f"{expiry}.{call_sid}.{self._mac(expiry, call_sid)}"

    def check(self, token: object) -> str | None:
        """The call id a valid, unexpired token was minted for; None for any other token."""
        if not isinstance(token, str) or len(token) > 160:
            return None
        parts = token.split(".")
        if len(parts) != 3 or not parts[0].isdigit() or len(parts[0]) > 12:
            return None
        expiry, call_sid, mac = parts
        if not hmac.compare_digest(self._mac(expiry, call_sid), mac):
            return None
        if int(expiry) < self._clock():
            return None
        return call_sid

    def verify(self, token: object, call_sid: str) -> bool:
        """Valid, unexpired and minted for exactly this call (the `start` check)."""
        minted_for = self.check(token)
        return minted_for is not None and hmac.compare_digest(minted_for, call_sid)
