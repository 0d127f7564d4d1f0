"""Telnyx webhook signatures: Ed25519 over `"{telnyx-timestamp}|{raw body}"`.

Telnyx signs every webhook (TeXML voice URL, status callbacks, Call Control events) with the
account's Ed25519 key and sends `telnyx-signature-ed25519` (base64, 64 bytes) and
`telnyx-timestamp` (Unix seconds). The receiver verifies with the account's public key
(Mission Control → Keys & Credentials → Public Key) and refuses timestamps more than
300 s away from now, as the official SDK does. The check itself is the official SDK's
(`telnyx.lib.webhook_verification.verify_webhook_signature`, needs the `carriers` extra);
around it this module adds what the SDK leaves out: strict header syntax, a body that is
not UTF-8 refused instead of raising, and a replay guard, since a captured request stays
valid for the whole 5-minute window: a signature already accepted in that window is refused.

A WebSocket upgrade from Telnyx is not signed. TeXML gives the stream no auth header, so the
media socket is trusted through the per-call token livecall put in a `<Parameter>` (it comes
back in the start frame), exactly as for Twilio.
"""

from __future__ import annotations

import binascii
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

__all__ = [
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "TOLERANCE_SECONDS",
    "TelnyxSignature",
    "sign_webhook",
    "single_use",
]

SIGNATURE_HEADER = "telnyx-signature-ed25519"
TIMESTAMP_HEADER = "telnyx-timestamp"
TOLERANCE_SECONDS = 300  # the SDK's window, both ways
_MAX_REMEMBERED = 100_000


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    for key, val in headers.items():
        if key.lower() == name:
            return val
    return None


class TelnyxSignature:
    """Checks `telnyx-signature-ed25519` with the account's public key (base64, 32 bytes).

    `verify` is False for a missing, malformed, wrong, expired (|now - ts| > 300 s) or
    replayed signature. `clock` is injectable for tests; the SDK applies its own clock too.
    """

    __slots__ = ("_clock", "_public_key", "_seen", "_verify", "tolerance")

    def __init__(
        self,
        public_key: str,
        *,
        tolerance: int = TOLERANCE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        try:
            raw = binascii.a2b_base64(public_key, strict_mode=True)
        except (binascii.Error, ValueError, TypeError):
            raise ValueError("a Telnyx public key must be base64") from None
        if len(raw) != 32:
            raise ValueError("a Telnyx public key is 32 bytes (base64 of an Ed25519 key)")
        try:
            from telnyx.lib.webhook_verification import verify_webhook_signature
        except ImportError as exc:  # pragma: no cover - the extra is installed in dev
            raise RuntimeError(
                "Telnyx signatures need the official SDK: pip install 'livecall[carriers]'"
            ) from exc
        self._verify = verify_webhook_signature
        self._public_key = public_key
        self.tolerance = min(tolerance, TOLERANCE_SECONDS)
        self._clock = clock
        self._seen: OrderedDict[str, int] = OrderedDict()

    def __repr__(self) -> str:
        return "TelnyxSignature(public_key=<redacted>)"

    def verify(self, headers: Mapping[str, str], body: bytes) -> bool:
        """Whether this raw body and its headers were signed by Telnyx just now, once."""
        signature = _header(headers, SIGNATURE_HEADER)
        stamp = _header(headers, TIMESTAMP_HEADER)
        if not signature or not stamp or not stamp.isascii() or not stamp.isdigit():
            return False
        if len(stamp) > 12 or len(signature) > 100:
            return False
        now = self._clock()
        if abs(now - int(stamp)) > self.tolerance:
            return False
        try:
            if len(binascii.a2b_base64(signature, strict_mode=True)) != 64:
                return False
            text = body.decode("utf-8")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            return False
        if signature in self._seen:
            return False  # a replay inside the window
        from telnyx.lib.webhook_verification import WebhookVerificationError

        try:
            self._verify(
                text, {SIGNATURE_HEADER: signature, TIMESTAMP_HEADER: stamp}, self._public_key
            )
        except WebhookVerificationError:
            return False
        self._remember(signature, int(stamp), now)
        return True

    def _remember(self, signature: str, stamp: int, now: float) -> None:
        seen = self._seen
        seen[signature] = stamp
        horizon = now - self.tolerance - 1
        while seen and (len(seen) > _MAX_REMEMBERED or next(iter(seen.values())) < horizon):
            seen.popitem(last=False)


def single_use(headers: Mapping[str, str]) -> tuple[str, float] | None:
    """A verified request's signature, used once for the whole window (both ways around its
    timestamp): what a replay check shared beyond this process claims."""
    signature = _header(headers, SIGNATURE_HEADER)
    return (signature, 2.0 * TOLERANCE_SECONDS + 1) if signature else None


def sign_webhook(private_key: bytes, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    """The headers Telnyx would send for `body` (the simulator's side; needs PyNaCl).

    `private_key` is the 32-byte Ed25519 seed.
    """
    from nacl.signing import SigningKey

    stamp = str(int(time.time()) if timestamp is None else timestamp)
    signed = SigningKey(private_key).sign(stamp.encode() + b"|" + body).signature
    return {
        SIGNATURE_HEADER: binascii.b2a_base64(signed, newline=False).decode(),
        TIMESTAMP_HEADER: stamp,
    }
