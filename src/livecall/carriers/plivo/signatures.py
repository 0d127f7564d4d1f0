"""Plivo webhook signatures (V3): HMAC-SHA256 over URL + sorted params + "." + nonce.

Per https://www.plivo.com/docs/voice/concepts/signature-validation: Plivo concatenates the
full request URL (scheme, port, query) and, for a POST, every parameter sorted by name as
`namevalue`; appends `.` and the per-request nonce (`X-Plivo-Signature-V3-Nonce`); signs it
with HMAC-SHA256 keyed by the auth token; sends the base64 in `X-Plivo-Signature-V3` (the
(sub)account's token) and `X-Plivo-Signature-Ma-V3` (the main account's token), each
possibly a comma-separated list.

The string to sign is built by the official SDK (`plivo.utils.signature_v3`), so its
canonicalisation is Plivo's own; the comparison is ours, constant time
(`hmac.compare_digest`: the SDK's `in` test is not).

Plivo sends no timestamp: the nonce is the only replay defence ("since nonce values are
unique, they can help protect your application server from replay attacks"). `NonceLedger`
remembers each accepted nonce for `replay_window_s` and refuses a second use; a capture
replayed after the window (or at another livecall instance) is not caught, which is why
the per-call stream token, not the webhook alone, gates the media socket.
"""

from __future__ import annotations

import base64
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from hashlib import sha256
from urllib.parse import parse_qs

import orjson
from plivo.utils.signature_v3 import construct_get_url, construct_post_url

__all__ = [
    "DEFAULT_REPLAY_WINDOW_S",
    "NonceLedger",
    "PlivoSignature",
    "form_params",
    "new_nonce",
    "single_use",
]

DEFAULT_REPLAY_WINDOW_S = 300.0
DEFAULT_MAX_NONCES = 100_000
_SIG = "x-plivo-signature-v3"
_SIG_MA = "x-plivo-signature-ma-v3"
_NONCE = "x-plivo-signature-v3-nonce"

Params = Mapping[str, str | list[str]]


class NonceLedger:
    """Nonces seen recently (sans I/O: the clock is injected). Bounded: oldest go first."""

    __slots__ = ("_clock", "_max", "_seen", "window_s")

    def __init__(
        self,
        window_s: float = DEFAULT_REPLAY_WINDOW_S,
        *,
        max_entries: int = DEFAULT_MAX_NONCES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self._max = max_entries
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def first_use(self, nonce: str) -> bool:
        """Record `nonce`; False if it was already used within the window (a replay)."""
        now = self._clock()
        seen = self._seen
        while seen:
            oldest, expires = next(iter(seen.items()))
            if expires > now and len(seen) < self._max:
                break
            del seen[oldest]
        if nonce in seen:
            return False
        seen[nonce] = now + self.window_s
        return True


def form_params(body: bytes, content_type: str = "") -> dict[str, str | list[str]]:
    """A webhook body as the params Plivo signed: a form (the norm) or a JSON object."""
    if not body:
        return {}
    if "json" in content_type.lower() or body.lstrip()[:1] == b"{":
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return {}
        if type(obj) is not dict:
            return {}
        return {
            str(k): v if isinstance(v, str) else orjson.dumps(v).decode() for k, v in obj.items()
        }
    parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] if len(v) == 1 else v for k, v in parsed.items()}


class PlivoSignature:
    """Check (and, for the simulator, make) V3 signatures. Tokens never appear in a repr."""

    __slots__ = ("_keys", "_ledger")

    def __init__(
        self,
        auth_token: str,
        *,
        main_account_token: str | None = None,
        ledger: NonceLedger | None = None,
    ) -> None:
        if not isinstance(auth_token, str) or not auth_token:
            raise ValueError("a Plivo auth token must be a non-empty string")
        keys = [(_SIG, auth_token.encode())]
        if main_account_token:
            keys.append((_SIG_MA, main_account_token.encode()))
        self._keys = tuple(keys)
        self._ledger = ledger if ledger is not None else NonceLedger()

    def __repr__(self) -> str:
        return "PlivoSignature(auth_token=<redacted>)"

    @staticmethod
    def _base(method: str, url: str, params: Params) -> str:
        construct = construct_get_url if method.upper() == "GET" else construct_post_url
        base: bytes = construct(url, dict(params))
        return base.decode("utf-8")

    @staticmethod
    def _mac(key: bytes, base: str, nonce: str) -> bytes:
        digest = hmac.new(key, f"{base}.{nonce}".encode(), sha256).digest()
        return base64.b64encode(digest)

    def sign(self, method: str, url: str, params: Params, nonce: str) -> str:
        """`X-Plivo-Signature-V3` for this request (the simulator's side)."""
        return self._mac(self._keys[0][1], self._base(method, url, params), nonce).decode()

    def verify(self, method: str, url: str, params: Params, headers: Mapping[str, str]) -> bool:
        """True if a V3 signature matches and its nonce is fresh; malformed input is False."""
        lower = {k.lower(): v for k, v in headers.items()}
        nonce = lower.get(_NONCE, "")
        if not nonce or len(nonce) > 200:
            return False
        try:
            base = self._base(method, url, params)
        except (TypeError, ValueError, AttributeError, UnicodeError):
            return False
        ok = False
        for header, key in self._keys:
            sent = lower.get(header)
            if not sent:
                continue
            want = self._mac(key, base, nonce)
            for candidate in sent.split(","):
                ok |= hmac.compare_digest(candidate.strip().encode(), want)
        return ok and self._ledger.first_use(nonce)

    def verify_request(self, url: str, headers: Mapping[str, str], body: bytes) -> bool:
        """`Carrier.verify_webhook`: a body means a POST of its params, none a GET/empty POST
        (which Plivo signs alike: the URL with its sorted query)."""
        ctype = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
        params = form_params(body, ctype)
        return self.verify("POST" if params else "GET", url, params, headers)


def single_use(headers: Mapping[str, str]) -> tuple[str, float] | None:
    """A verified request's nonce and the window it stays used for: what a replay check
    shared beyond this process (every worker and instance) claims."""
    nonce = next((v for k, v in headers.items() if k.lower() == _NONCE), "")
    return (nonce, DEFAULT_REPLAY_WINDOW_S) if nonce else None


def new_nonce() -> str:
    """A nonce like Plivo's (20 digits)."""
    return "".join(secrets.choice("0123456789") for _ in range(20))
