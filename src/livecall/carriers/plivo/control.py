"""Plivo REST call control: hang up, transfer, place an outbound call (async, `httpx`).

Documented endpoints (https://www.plivo.com/docs/voice/api/call), HTTP Basic auth with
the Auth ID and Auth Token, JSON bodies:

- hang up:   `DELETE /v1/Account/{auth_id}/Call/{call_uuid}/`            -> 204
- transfer:  `POST   /v1/Account/{auth_id}/Call/{call_uuid}/` `legs=aleg`, `aleg_url` -> 202
  (Plivo fetches new XML from `aleg_url`, e.g. `answer.dial_xml(number)`, which ends the stream)
- outbound:  `POST   /v1/Account/{auth_id}/Call/` `from`, `to`, `answer_url` -> 201

Why not the official `plivo` SDK's RestClient (it is in the `carriers` extra for XML and
signatures): it is synchronous (`requests`), so each call would block the event loop or take
a thread, and its API host is a module constant, so a fake cannot stand in. `base_url` here
is overridable; the token never appears in a repr.

`PlivoCallControl` is the carrier-neutral `CallControl` over it: a transfer publishes the
`<Dial>` XML at a single-use URL livecall serves (`publish`) and points the caller's leg there.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from livecall.telephony.call_control import CallControlError

__all__ = ["CallEnded", "PlivoCallControl", "PlivoControl", "PlivoRestError"]

_CALL_ID = re.compile(r"[0-9A-Za-z-]{8,64}")
_NUMBER = re.compile(r"\+?[0-9]{3,20}|sip:[^\s<>\"]{3,256}")


class PlivoRestError(CallControlError):
    """Plivo refused a request; the message has the status and Plivo's error text, no secrets."""


class CallEnded(PlivoRestError):
    """Plivo does not know the call (404): it is already over."""


class PlivoControl:
    """Hang up, transfer and dial through Plivo's REST API."""

    def __init__(
        self,
        auth_id: str,
        auth_token: str,
        *,
        base_url: str = "https://api.plivo.com",
        timeout: float = 10.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if not re.fullmatch(r"[A-Z0-9]{10,40}", auth_id or ""):
            raise ValueError("a Plivo Auth ID is 10-40 capital letters and digits (MA…/SA…)")
        if not auth_token:
            raise ValueError("a Plivo auth token must be a non-empty string")
        self.auth_id = auth_id
        self._base = f"{base_url.rstrip('/')}/v1/Account/{auth_id}"
        self._auth = httpx.BasicAuth(auth_id, auth_token)
        self._client = client
        self._own = client is None
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"PlivoControl(auth_id={self.auth_id!r}, auth_token=<redacted>)"

    async def aclose(self) -> None:
        if self._own and self._client is not None:
            await self._client.aclose()
            self._client = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout, trust_env=False)
        return self._client

    async def _request(
        self, method: str, path: str, body: dict[str, Any] | None, ok: int
    ) -> dict[str, Any]:
        resp = await self._http().request(
            method,
            self._base + path,
            json=body,
            auth=self._auth,
            headers={"Accept": "application/json", "User-Agent": "livecall"},
        )
        if resp.status_code == 404:
            raise CallEnded(f"Plivo {method} {path}: 404 (no such call)")
        if resp.status_code != ok:
            raise PlivoRestError(f"Plivo {method} {path}: {resp.status_code} {_error_text(resp)}")
        if not resp.content:
            return {}
        try:
            data = resp.json()
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}

    async def hangup(self, call_uuid: str) -> bool:
        """End the call; False if it was already over."""
        _check_call(call_uuid)
        try:
            await self._request("DELETE", f"/Call/{call_uuid}/", None, 204)
        except CallEnded:
            return False
        return True

    async def transfer(self, call_uuid: str, xml_url: str, *, method: str = "POST") -> None:
        """Point the caller's leg at new XML (`answer.dial_xml` to reach a number)."""
        _check_call(call_uuid)
        if not xml_url.startswith(("https://", "http://")):
            raise ValueError("a transfer needs an absolute http(s) URL that serves Plivo XML")
        body = {"legs": "aleg", "aleg_url": xml_url, "aleg_method": method}
        await self._request("POST", f"/Call/{call_uuid}/", body, 202)

    async def dial(
        self,
        to: str,
        from_: str,
        answer_url: str,
        *,
        answer_method: str = "POST",
        hangup_url: str | None = None,
        ring_timeout_s: int | None = None,
    ) -> str:
        """Place an outbound call; Plivo fetches `answer_url` when it is answered. Returns
        the request_uuid (the call's id arrives on the answer webhook as CallUUID)."""
        for number in (to, from_):
            if not _NUMBER.fullmatch(number):
                raise ValueError(f"not a phone number or SIP URI: {number!r}")
        body: dict[str, Any] = {
            "from": from_,
            "to": to,
            "answer_url": answer_url,
            "answer_method": answer_method,
        }
        if hangup_url:
            body["hangup_url"] = hangup_url
        if ring_timeout_s is not None:
            body["ring_timeout"] = ring_timeout_s
        data = await self._request("POST", "/Call/", body, 201)
        uuid = data.get("request_uuid")
        if isinstance(uuid, list):
            uuid = uuid[0] if uuid else None
        if not isinstance(uuid, str):
            raise PlivoRestError("Plivo answered the call request without a request_uuid")
        return uuid


def _check_call(call_uuid: str) -> None:
    if not _CALL_ID.fullmatch(call_uuid or ""):
        raise ValueError(f"not a Plivo call UUID: {call_uuid!r}")


def _error_text(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:120]
    if isinstance(data, dict) and isinstance(error := data.get("error"), str):
        return error[:120]
    return resp.text[:120]


class PlivoCallControl:
    """`CallControl` for Plivo calls: hang up (`DELETE`), cold or warm transfer via `aleg_url`
    (warm: the `<Dial>` there has `confirmSound` and `action`, see `answer.dial_xml`).

    `publish(xml)` keeps a transfer's Plivo XML behind a single-use URL livecall serves and
    returns that URL (Plivo fetches it, signed, once the transfer is accepted).
    """

    warm_transfer = True  # `<Dial confirmSound>` briefs the called party before bridging
    transfer_refusal: str | None = None

    def briefs(self, number: str) -> bool:
        return True  # numbers and SIP URIs alike

    def __init__(self, control: PlivoControl, publish: Callable[[str], Awaitable[str]]) -> None:
        self.control = control
        self._publish = publish

    def __repr__(self) -> str:
        return f"PlivoCallControl({self.control!r})"

    async def hangup(self, call_id: str) -> bool:
        try:
            return await self.control.hangup(call_id)
        except (httpx.HTTPError, ValueError) as exc:
            raise PlivoRestError(f"Plivo hangup failed: {type(exc).__name__}") from None

    async def transfer(
        self,
        call_id: str,
        number: str,
        say: str | None = None,
        *,
        whisper_url: str | None = None,
        dial_action: str | None = None,
    ) -> bool:
        from livecall.carriers.plivo.answer import dial_xml

        try:
            xml = dial_xml(  # Plivo dials digits, no "+"
                number.removeprefix("+"), say=say, confirm_sound=whisper_url, action=dial_action
            )
            await self.control.transfer(call_id, await self._publish(xml))
        except CallEnded:
            return False
        except ValueError as exc:
            raise PlivoRestError(f"Plivo transfer not sent: {exc}") from None
        except httpx.HTTPError as exc:
            raise PlivoRestError(f"Plivo transfer failed: {type(exc).__name__}") from None
        return True
