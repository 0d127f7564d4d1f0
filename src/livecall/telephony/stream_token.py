"""Per-call stream credentials, sans I/O: who may open a media stream for which call.

Twilio signs only the `wss://…/ws/twilio` URL of a stream upgrade, so its `X-Twilio-Signature`
is the same for every call: seen once, it opens any number of streams. So the TwiML that
connects a call also carries a short-lived HMAC token as a `<Parameter>` (Twilio echoes it in
`start.customParameters`), bound to the call (CallSid, AccountSid) and an expiry, and a stream
whose `start` does not carry a valid one is closed before any Gemini session opens.

Token text: ``v1.<expiry unix s>.<ref>.<mac>``. `ref` is ``-`` for a token bound to a CallSid
(inbound calls: the webhook knows the CallSid), or a random reference for an outbound call,
whose TwiML is written before Twilio assigns the CallSid; the first stream that presents such a
token claims it for its CallSid (in the claims store every worker and instance shares,
`livecall.store.claims_db`, under `outbound_claim_kind`), and no other CallSid can use it after.
`mac` is HMAC-SHA256 over the version, subject (CallSid or ref), AccountSid and expiry, under
a key derived from the configured secret with a purpose label, so a token minted for one
purpose (Twilio streams, the browser softphone) is worthless for the other.

Expiry bounds when a *first* stream may start; a call already live here accepts its own valid
token again (Twilio may reconnect a stream) whatever the time, so a long call is not cut off.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

__all__ = [
    "ACCOUNT_SID_RE",
    "CALL_SID_RE",
    "DEFAULT_TTL_S",
    "TOKEN_PARAMETER",
    "StreamTokens",
    "TokenCheck",
    "derive_key",
    "outbound_claim_kind",
    "outbound_claim_ttl",
]

TOKEN_PARAMETER = "lc_token"
DEFAULT_TTL_S = 300.0  # Twilio connects the stream within seconds of the webhook's answer
CALL_SID_RE = re.compile(r"^CA[0-9a-f]{32}\Z")
ACCOUNT_SID_RE = re.compile(r"^AC[0-9a-f]{32}\Z")
_REF_RE = re.compile(r"^[0-9a-f]{32}\Z")
_MAX_TOKEN_CHARS = 128
_VERSION = "v1"
_NO_REF = "-"


def derive_key(secret: str | bytes, purpose: str) -> bytes:
    """A 32-byte key for one purpose from a configured secret (HMAC-SHA256 with a label)."""
    raw = secret.encode() if isinstance(secret, str) else secret
    if not raw:
        raise ValueError("a stream token key needs a non-empty secret")
    return hmac.new(raw, f"livecall stream token key v1: {purpose}".encode(), "sha256").digest()


@dataclass(frozen=True, slots=True)
class TokenCheck:
    """The verdict on a presented token: `ok`, or `reason` says what was wrong (for logs)."""

    ok: bool
    reason: str = ""
    ref: str | None = None  # the outbound reference a token carried, if any
    minted: float | None = None  # when a valid token was minted (its expiry less the TTL)

    def __bool__(self) -> bool:
        return self.ok


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class StreamTokens:
    """Mints and checks stream tokens under one key; `ttl_s` is how long a first start may wait.

    The key never appears in a repr. Time is passed in (`now`, unix seconds): nothing here
    reads a clock.
    """

    __slots__ = ("_key", "ttl_s")

    def __init__(self, key: bytes, *, ttl_s: float = DEFAULT_TTL_S) -> None:
        if len(key) < 16:
            raise ValueError("a stream token key must be at least 16 bytes")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self._key = key
        self.ttl_s = ttl_s

    def __repr__(self) -> str:
        return f"StreamTokens(key=<redacted>, ttl_s={self.ttl_s:g})"

    def _mac(self, subject: str, account_sid: str, expiry: int) -> str:
        message = "\0".join((_VERSION, subject, account_sid, str(expiry))).encode()
        return _b64(hmac.new(self._key, message, hashlib.sha256).digest())

    def for_call(self, call_sid: str, account_sid: str, now: float) -> str:
        """A token for the stream of the call `call_sid` (its CallSid is known: inbound)."""
        if not call_sid:
            raise ValueError("a call token needs a CallSid")
        expiry = int(now + self.ttl_s)
        return f"{_VERSION}.{expiry}.{_NO_REF}.{self._mac(call_sid, account_sid, expiry)}"

    def for_outbound(self, account_sid: str, now: float) -> str:
        """A token for a call not yet created (outbound): claimed by its first stream."""
        ref = secrets.token_hex(16)
        expiry = int(now + self.ttl_s)
        return f"{_VERSION}.{expiry}.{ref}.{self._mac('ref:' + ref, account_sid, expiry)}"

    def check(
        self,
        token: str | None,
        call_sid: str,
        account_sid: str,
        now: float,
        *,
        live: bool = False,
    ) -> TokenCheck:
        """Is `token` valid for a stream of `call_sid` on `account_sid` at `now`?

        `live`: the call is already carried here (a reconnect), so an expired token of that
        very call still counts. The comparison is constant-time; the reason never quotes the
        token.
        """
        if not token:
            return TokenCheck(False, "no stream token")
        if len(token) > _MAX_TOKEN_CHARS:
            return TokenCheck(False, "stream token too long")
        parts = token.split(".")
        if len(parts) != 4 or parts[0] != _VERSION:
            return TokenCheck(False, "malformed stream token")
        _, expiry_s, ref, mac = parts
        if not expiry_s.isascii() or not expiry_s.isdigit() or len(expiry_s) > 12:
            return TokenCheck(False, "malformed stream token expiry")
        expiry = int(expiry_s)
        if ref == _NO_REF:
            subject, found_ref = call_sid, None
        elif _REF_RE.match(ref):
            subject, found_ref = "ref:" + ref, ref
        else:
            return TokenCheck(False, "malformed stream token reference")
        expected = self._mac(subject, account_sid, expiry)
        if not hmac.compare_digest(expected.encode(), mac.encode("ascii", "replace")):
            return TokenCheck(False, "stream token does not match this call and account")
        if not live and now > expiry:
            return TokenCheck(False, "stream token expired")
        return TokenCheck(True, ref=found_ref, minted=expiry - self.ttl_s)


CLAIM_MARGIN_S = 600.0


def outbound_claim_kind(carrier: str) -> str:
    """The kind under which a carrier's outbound token references are claimed (one table)."""
    return f"{carrier}-outbound"


def outbound_claim_ttl(tokens: StreamTokens, max_call_duration_s: float) -> float:
    """How long an outbound reference's claim must hold: its token's first-start window, then
    the longest call (a live call's stream may reconnect with its token), and a margin."""
    return tokens.ttl_s + max_call_duration_s + CLAIM_MARGIN_S
