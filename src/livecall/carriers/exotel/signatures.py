"""Who is calling: Exotel signs nothing, so trust rides in the URLs livecall hands out.

Exotel documents no signature on its HTTP requests (dynamic applet URLs, Passthru,
StatusCallback) and none on the stream. What it offers is what you put in the URL: HTTP
Basic credentials (`wss://user:secret@host/...`, sent as `Authorization: Basic ...`) and
query parameters, plus an IP allowlist arranged with Exotel. livecall therefore checks:

- **`ExotelUrlAuth`** (here): the applet endpoint URL configured in the Exotel flow carries
  a shared secret, as Basic credentials or as a `key` query parameter; every request must
  present it (constant-time comparison). There is no timestamp, so no replay window: the
  secret is a static bearer credential (HTTPS only; pair it with Exotel's IP allowlist).
- **the per-call stream token** every carrier's stream carries
  (`livecall.telephony.stream_token`, keyed for Exotel by `server.carrier_routes`): the
  stream URL livecall answers with holds an HMAC over the call's id and an expiry, checked
  against `start.call_sid`, so a token seen once can neither open a stream after its expiry
  nor be moved to another call.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from urllib.parse import parse_qsl, urlsplit

__all__ = ["URL_KEY_PARAM", "ExotelUrlAuth"]

URL_KEY_PARAM = "key"


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
