"""Vonage signed webhooks: a JWT (HS256, the account's signature secret) on every callback.

Each signed Voice API webhook carries `Authorization: Bearer <JWT>`. The JWT is HS256 over the
signature secret and claims `iat`, `jti`, `iss` ("Vonage"), `api_key`, `application_id` and
`payload_hash`: SHA-256 (hex) of the payload, which for a POST is the JSON body and for a GET
the query parameters as a compact JSON object in their order
(https://developer.vonage.com/en/getting-started/concepts/webhooks#decoding-signed-webhooks,
https://developer.vonage.com/en/voice/voice-api/guides/signed-webhooks).

The signature itself is checked with the official SDK's verifier (`vonage_jwt.verify_signature`)
when the `vonage` package is installed, else with PyJWT (what that verifier wraps). Vonage
documents no freshness window, so livecall sets one: `iat` at most `max_age_s` old (5 min) and
not in the future beyond `clock_skew_s`, and each `jti` accepted once within that window, so a
captured request cannot be replayed: here, in this process, and (`single_use`, claimed by the
server in the store every worker and instance shares) at any other worker or instance. The
secret never appears in a repr or an error.

The same JWT signs a WebSocket opening handshake when the NCCO asks for it
(`"authorization": {"type": "vonage"}`, @vonage/voice `WebsocketAuthorization`):
`check_handshake` verifies it there, without a payload hash and with `jti` required.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import jwt
import orjson

__all__ = ["SignatureRejected", "VonageSignature", "payload_hash"]

try:  # the official verifier, when the `carriers` extra is installed
    from vonage_jwt.errors import VonageVerifyJwtError
    from vonage_jwt.verify_jwt import verify_signature as _sdk_verify
except ImportError:  # pragma: no cover - depends on the environment
    _sdk_verify = None
    VonageVerifyJwtError = Exception


class SignatureRejected(ValueError):
    """Why a webhook's signature was refused (for logs; never includes the token or secret)."""


def _query_json(url: str) -> bytes:
    fields = dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))
    return orjson.dumps(fields)


def payload_hash(method: str, url: str, body: bytes) -> str:
    """The `payload_hash` Vonage puts in the JWT: SHA-256 hex of the body (POST) or query (GET)."""
    data = _query_json(url) if method.upper() in ("GET", "HEAD") else body
    return hashlib.sha256(data).hexdigest()


def _body_variants(body: bytes) -> list[bytes]:
    """The body as sent, and as compact JSON in the same key order (what Vonage hashes)."""
    variants = [body]
    try:
        loaded = orjson.loads(body)
    except orjson.JSONDecodeError:
        return variants
    compact = orjson.dumps(loaded)
    if compact != body:
        variants.append(compact)
    return variants


class VonageSignature:
    """Checks (and, for simulators, makes) the JWT of Vonage's signed webhooks."""

    __slots__ = (
        "_clock",
        "_secret",
        "_seen",
        "api_key",
        "application_id",
        "clock_skew_s",
        "max_age_s",
        "require_payload_hash",
    )

    def __init__(
        self,
        signature_secret: str,
        *,
        api_key: str | None = None,
        application_id: str | None = None,
        max_age_s: float = 300.0,
        clock_skew_s: float = 30.0,
        require_payload_hash: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(signature_secret, str) or not signature_secret:
            raise ValueError("a Vonage signature secret must be a non-empty string")
        self._secret = signature_secret
        self.api_key = api_key
        self.application_id = application_id
        self.max_age_s = max_age_s
        self.clock_skew_s = clock_skew_s
        self.require_payload_hash = require_payload_hash
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()  # jti -> when it stops mattering

    def __repr__(self) -> str:
        return "VonageSignature(signature_secret=<redacted>)"

    # ------------------------------------------------------------------ verify

    def verify(
        self, headers: Mapping[str, str], *, method: str, url: str, body: bytes = b""
    ) -> bool:
        """True if the request carries a valid, fresh, unreplayed JWT over this payload."""
        try:
            self.check(headers, method=method, url=url, body=body)
        except SignatureRejected:
            return False
        return True

    def check(
        self, headers: Mapping[str, str], *, method: str, url: str, body: bytes = b""
    ) -> dict[str, Any]:
        """The verified claims, or SignatureRejected saying which rule failed."""
        return self._check(headers, (method, url, body))

    def check_handshake(self, headers: Mapping[str, str]) -> dict[str, Any]:
        """The claims of the JWT Vonage sends on a WebSocket opening handshake when the NCCO's
        endpoint asks for `"authorization": {"type": "vonage"}`, or SignatureRejected.

        It is the signed webhooks' JWT (same secret, same claims): signature, `iat` window,
        `api_key`/`application_id` when configured and `jti` once are checked as for a
        webhook. Its `payload_hash` is not: Vonage does not document what a handshake's
        payload is (a GET without a body), and the upgrade carries nothing to tamper with.
        """
        return self._check(headers, None)

    def _check(
        self, headers: Mapping[str, str], payload: tuple[str, str, bytes] | None
    ) -> dict[str, Any]:
        token = _bearer(headers)
        if not self._signature_ok(token):
            raise SignatureRejected("JWT signature does not verify with the signature secret")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                options={"require": ["iat"]},
                leeway=self.clock_skew_s,
            )
        except jwt.PyJWTError as exc:
            raise SignatureRejected(f"JWT rejected: {type(exc).__name__}: {exc}") from None
        now = self._clock()
        iat = claims["iat"]
        if type(iat) not in (int, float):
            raise SignatureRejected("JWT iat is not a number")
        if iat > now + self.clock_skew_s:
            raise SignatureRejected("JWT iat is in the future")
        if now - iat > self.max_age_s:
            raise SignatureRejected(f"JWT is older than {self.max_age_s:g} s (replay window)")
        for claim, expected in (("api_key", self.api_key), ("application_id", self.application_id)):
            if expected is not None and claims.get(claim) != expected:
                raise SignatureRejected(f"JWT {claim} is not this account's")
        if payload is not None:
            self._check_payload(claims, *payload)
        jti = claims.get("jti")
        if jti is None and payload is None:  # an upgrade has nothing else to bind it to
            raise SignatureRejected("JWT has no jti (a handshake's must be single-use)")
        if jti is not None:
            if type(jti) is not str or not jti:
                raise SignatureRejected("JWT jti must be a non-empty string")
            self._forget_old(now)
            if jti in self._seen:
                raise SignatureRejected("JWT jti was already used (replayed request)")
            self._seen[jti] = iat + self.max_age_s + self.clock_skew_s
        return claims

    def single_use(self, headers: Mapping[str, str]) -> tuple[str, float] | None:
        """A checked request's `jti` and for how many more seconds it must stay used (its
        `iat` window), for a replay check shared beyond this process; None without one.

        Call only once `check` accepted these headers: the token is read, not verified.
        """
        try:
            claims = jwt.decode(_bearer(headers), options={"verify_signature": False})
        except (SignatureRejected, jwt.PyJWTError):
            return None
        jti, iat = claims.get("jti"), claims.get("iat")
        if type(jti) is not str or not jti or not isinstance(iat, int | float):
            return None
        until = iat + self.max_age_s + self.clock_skew_s
        return jti, max(1.0, until - self._clock())

    def _signature_ok(self, token: str) -> bool:
        if _sdk_verify is not None:
            try:
                return bool(_sdk_verify(token, self._secret))
            except VonageVerifyJwtError:
                pass  # not a bad signature: a time claim; decided below with livecall's skew
        try:
            jwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                options={"verify_exp": False, "verify_iat": False, "verify_nbf": False},
            )
        except jwt.PyJWTError:
            return False
        return True

    def _check_payload(self, claims: Mapping[str, Any], method: str, url: str, body: bytes) -> None:
        claimed = claims.get("payload_hash")
        if claimed is None:
            if self.require_payload_hash:
                raise SignatureRejected("JWT has no payload_hash")
            return
        if type(claimed) is not str:
            raise SignatureRejected("JWT payload_hash is not a string")
        claimed = claimed.lower()
        if method.upper() in ("GET", "HEAD"):
            candidates = [_query_json(url)]
        else:
            candidates = _body_variants(body)
        for data in candidates:
            if hmac.compare_digest(hashlib.sha256(data).hexdigest(), claimed):
                return
        raise SignatureRejected("payload_hash does not match the request payload")

    def _forget_old(self, now: float) -> None:
        seen = self._seen
        while seen:
            jti, until = next(iter(seen.items()))
            if until >= now and len(seen) < 100_000:
                break
            del seen[jti]

    # ------------------------------------------------------------------ sign (simulators)

    def sign(
        self,
        *,
        method: str,
        url: str,
        body: bytes = b"",
        iat: float | None = None,
        jti: str | None = None,
        api_key: str = "",
        application_id: str = "",
    ) -> str:
        """The `Authorization` header value Vonage would send for this request."""
        claims = {
            "iat": int(self._clock() if iat is None else iat),
            "jti": jti or str(uuid.uuid4()),
            "iss": "Vonage",
            "payload_hash": payload_hash(method, url, body),
            "api_key": api_key or self.api_key or "",
            "application_id": application_id or self.application_id or "",
        }
        return "Bearer " + str(jwt.encode(claims, self._secret, algorithm="HS256"))


def _bearer(headers: Mapping[str, str]) -> str:
    value = headers.get("authorization") or headers.get("Authorization")
    if not value:
        raise SignatureRejected("no Authorization header")
    scheme, _, token = value.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise SignatureRejected("Authorization is not a Bearer token")
    if len(token) > 8192:
        raise SignatureRejected("Authorization token is too long")
    return token
