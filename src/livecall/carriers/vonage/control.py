"""Vonage Voice API call control over REST: hang up, transfer, send DTMF, place a call.

Endpoints (https://developer.vonage.com/en/api/voice): `PUT /v1/calls/{uuid}` with
`{"action":"hangup"}` or `{"action":"transfer","destination":{"type":"ncco","ncco":[…]}}`,
`PUT /v1/calls/{uuid}/dtmf` with `{"digits":"…"}`, `POST /v1/calls`. Requests carry an
application JWT (RS256 over the application's private key) made by the official SDK's
`vonage_jwt.JwtClient`. The SDK's own HTTP client is synchronous (`requests`) and pinned to
https on Vonage's hosts, so the calls themselves go through `httpx.AsyncClient`, never blocking
the event loop, to a base URL a fake can replace. Vonage recommends sending a call's control
to the `region_url` its answer webhook named; `base_url=` per call does that.

Hanging up over REST (rather than closing the socket) is what Vonage advises: it raises no
`disconnected` event, so a `disconnected` always means an accident worth a fallback.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

import httpx

__all__ = ["DEFAULT_API_BASE", "VonageApiError", "VonageCallControl"]

DEFAULT_API_BASE = "https://api.nexmo.com"
_UUID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_DTMF_RE = re.compile(r"^[0-9*#pP]{1,64}$")  # p = a 500 ms pause
_NUMBER_RE = re.compile(r"^\+?[0-9]{5,16}$")


class VonageApiError(RuntimeError):
    """Vonage answered a control request with an error status."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"Vonage API error {status}: {detail}")
        self.status = status


def _application_jwt(application_id: str, private_key: str) -> str:
    try:
        from vonage_jwt import JwtClient
    except ImportError:  # pragma: no cover - the `carriers` extra is not installed
        import jwt

        now = int(time.time())
        claims = {
            "application_id": application_id,
            "iat": now,
            "exp": now + 900,
            "jti": str(uuid.uuid4()),
        }
        return str(jwt.encode(claims, private_key, algorithm="RS256"))
    token = JwtClient(application_id, private_key).generate_application_jwt()
    return token.decode() if isinstance(token, bytes) else str(token)


class VonageCallControl:
    """Async REST control of Vonage calls; the private key never appears in a repr."""

    __slots__ = (
        "_http",
        "_own_http",
        "_private_key",
        "_token",
        "_token_at",
        "application_id",
        "base_url",
    )

    def __init__(
        self,
        application_id: str,
        private_key: str,
        *,
        base_url: str = DEFAULT_API_BASE,
        http_client: httpx.AsyncClient | None = None,
        timeout: float = 10.0,
    ) -> None:
        if not application_id or not private_key:
            raise ValueError("Vonage call control needs an application id and a private key")
        self.application_id = application_id
        self._private_key = private_key
        self.base_url = base_url.rstrip("/")
        self._own_http = http_client is None
        self._token = ""
        self._token_at = 0.0
        self._http = http_client or httpx.AsyncClient(timeout=timeout, trust_env=False)

    def __repr__(self) -> str:
        return f"VonageCallControl(application_id={self.application_id!r}, private_key=<redacted>)"

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    def _jwt(self) -> str:
        """An application JWT, reused for 10 of its 15 minutes (an RSA signature costs CPU)."""
        now = time.monotonic()
        if not self._token or now - self._token_at > 600:
            self._token = _application_jwt(self.application_id, self._private_key)
            self._token_at = now
        return self._token

    async def _request(
        self, method: str, path: str, body: Mapping[str, Any], base_url: str | None
    ) -> httpx.Response:
        url = (base_url.rstrip("/") if base_url else self.base_url) + path
        response = await self._http.request(
            method,
            url,
            json=dict(body),
            headers={"Authorization": f"Bearer {self._jwt()}", "Accept": "application/json"},
        )
        if response.status_code >= 400:
            detail = response.text[:200]
            raise VonageApiError(response.status_code, detail)
        return response

    @staticmethod
    def _call_path(call_uuid: str) -> str:
        if not _UUID_RE.match(call_uuid):
            raise ValueError(f"not a Vonage call uuid: {call_uuid[:70]!r}")
        return f"/v1/calls/{call_uuid}"

    async def hangup(self, call_uuid: str, *, base_url: str | None = None) -> None:
        """End the call (no `disconnected` event follows, unlike closing the socket)."""
        await self._request("PUT", self._call_path(call_uuid), {"action": "hangup"}, base_url)

    async def transfer_to_number(
        self,
        call_uuid: str,
        number: str,
        *,
        from_number: str | None = None,
        base_url: str | None = None,
    ) -> None:
        """Move the call to a new NCCO that connects it to `number` (E.164)."""
        if not _NUMBER_RE.match(number):
            raise ValueError("a transfer target must be a phone number in E.164 form")
        connect: dict[str, Any] = {
            "action": "connect",
            "endpoint": [{"type": "phone", "number": number.lstrip("+")}],
        }
        if from_number:
            connect["from"] = from_number.lstrip("+")
        body = {"action": "transfer", "destination": {"type": "ncco", "ncco": [connect]}}
        await self._request("PUT", self._call_path(call_uuid), body, base_url)

    async def send_dtmf(self, call_uuid: str, digits: str, *, base_url: str | None = None) -> None:
        """Play DTMF into the call (the stream cannot)."""
        if not _DTMF_RE.match(digits):
            raise ValueError("DTMF digits must be 0-9, *, # or p (pause), at most 64")
        path = self._call_path(call_uuid) + "/dtmf"
        await self._request("PUT", path, {"digits": digits}, base_url)

    async def create_call(
        self,
        to_number: str,
        from_number: str,
        *,
        answer_url: str,
        event_url: str | None = None,
        answer_method: str = "GET",
    ) -> str:
        """Place an outbound call whose NCCO comes from `answer_url`; returns its uuid."""
        for n in (to_number, from_number):
            if not _NUMBER_RE.match(n):
                raise ValueError("numbers must be in E.164 form")
        body: dict[str, Any] = {
            "to": [{"type": "phone", "number": to_number.lstrip("+")}],
            "from": {"type": "phone", "number": from_number.lstrip("+")},
            "answer_url": [answer_url],
            "answer_method": answer_method,
        }
        if event_url:
            body["event_url"] = [event_url]
        response = await self._request("POST", "/v1/calls", body, None)
        data = response.json()
        call_uuid = data.get("uuid") if isinstance(data, dict) else None
        if not isinstance(call_uuid, str):
            raise VonageApiError(response.status_code, "no uuid in the create-call answer")
        return call_uuid
