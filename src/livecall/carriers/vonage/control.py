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

`VonageCall` is the carrier-neutral `CallControl` over this client for one call, sent to the
call's region: hang-up, and a transfer (an NCCO that says `say`, then connects; warm with the
connect's `onAnswer` and a synchronous `eventUrl`).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from livecall.telephony.call_control import CallControlError

__all__ = [
    "CONNECT_FAILED",
    "DEFAULT_API_BASE",
    "VonageApiError",
    "VonageCall",
    "VonageCallControl",
    "after_dial_ncco",
    "load_private_key",
    "transfer_ncco",
    "whisper_ncco",
]

DEFAULT_API_BASE = "https://api.nexmo.com"
_UUID_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_DTMF_RE = re.compile(r"^[0-9*#pP]{1,64}$")  # p = a 500 ms pause
_NUMBER_RE = re.compile(r"^\+?[0-9]{5,16}$")
_SIP_RE = re.compile(r"^sips?:[^\s<>\"]{3,250}$")
MAX_SAY_CHARS = 1500  # a talk action's text is at most 1,500 characters


class VonageApiError(CallControlError):
    """Vonage answered a control request with an error status (0: it could not be reached)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"Vonage API error {status}: {detail}")
        self.status = status


def load_private_key(value: str) -> str:
    """The application's PEM private key: given inline (its newlines possibly written as
    ``\\n``, as env files do) or as the path of a file holding it."""
    text = value.strip()
    if "-----BEGIN" not in text:
        path = Path(text).expanduser()
        try:
            text = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:  # (the value may be a mangled key: unsaid)
            raise ValueError(
                f"VONAGE_PRIVATE_KEY: not a PEM key, and no readable file ({type(exc).__name__})"
            ) from None
    text = text.replace("\\n", "\n")
    if "-----BEGIN" not in text or "PRIVATE KEY-----" not in text:
        raise ValueError("VONAGE_PRIVATE_KEY is neither a PEM private key nor a file holding one")
    return text + "\n"


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
        try:
            response = await self._http.request(
                method,
                url,
                json=dict(body),
                headers={"Authorization": f"Bearer {self._jwt()}", "Accept": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise VonageApiError(0, f"unreachable ({type(exc).__name__})") from None
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
        say: str | None = None,
        from_number: str | None = None,
        base_url: str | None = None,
        on_answer: str | None = None,
        event_url: str | None = None,
    ) -> None:
        """Move the call to a new NCCO that says `say` (when given), then connects it to
        `number` (E.164, or a ``sip:`` URI); warm with `on_answer`/`event_url`."""
        ncco = transfer_ncco(
            number, say=say, from_number=from_number, on_answer=on_answer, event_url=event_url
        )
        body = {"action": "transfer", "destination": {"type": "ncco", "ncco": ncco}}
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


#: A synchronous connect's statuses whose eventUrl answer (an NCCO) takes over the call:
#: no one took it.
CONNECT_FAILED = frozenset({"timeout", "failed", "rejected", "unanswered", "busy", "cancelled"})


def transfer_ncco(
    number: str,
    *,
    say: str | None = None,
    from_number: str | None = None,
    on_answer: str | None = None,
    event_url: str | None = None,
) -> list[dict[str, Any]]:
    """The NCCO a transfer moves the call to: `talk` (when `say`), then `connect`.

    Warm: a phone endpoint's `onAnswer.url` serves the NCCO the answering party hears before
    joining (Vonage fetches it, signed, when they pick up); `event_url` makes the connect
    synchronous (`eventType`), so when no one takes the call the NCCO its eventUrl answers
    replaces the call's (the caller hears the no-answer line). A SIP endpoint has no
    `onAnswer`: it is connected cold.
    """
    if _SIP_RE.match(number):
        endpoint: dict[str, Any] = {"type": "sip", "uri": number}
    elif _NUMBER_RE.match(number):
        endpoint = {"type": "phone", "number": number.lstrip("+")}
        if on_answer:
            endpoint["onAnswer"] = {"url": on_answer}
    else:
        raise ValueError("a transfer target must be an E.164 number or a sip: URI")
    connect: dict[str, Any] = {"action": "connect", "endpoint": [endpoint]}
    if event_url:
        connect |= {"eventType": "synchronous", "eventUrl": [event_url], "eventMethod": "POST"}
    if from_number:
        connect["from"] = from_number.lstrip("+")
    ncco: list[dict[str, Any]] = []
    if say and say.strip():
        ncco.append({"action": "talk", "text": say.strip()[:MAX_SAY_CHARS]})
    ncco.append(connect)
    return ncco


class VonageCall:
    """`CallControl` (and `DtmfControl`) for one Vonage call: REST hang-up, cold transfer and
    DTMF, sent to the region the call's answer webhook named (`region_url`; None: the
    client's base URL)."""

    warm_transfer = True  # a phone endpoint's `onAnswer` briefs the answering party first
    transfer_refusal: str | None = None

    def briefs(self, number: str) -> bool:
        return not _SIP_RE.match(number)  # a SIP endpoint has no `onAnswer`

    def __init__(
        self,
        rest: VonageCallControl,
        region_url: str | None = None,
        *,
        from_number: str | None = None,
    ) -> None:
        self.rest = rest
        self.region_url = region_url
        self.from_number = from_number or None  # the transfer's caller id (a Vonage number)

    def __repr__(self) -> str:
        return f"VonageCall({self.rest!r}, region_url={self.region_url!r})"

    async def _run(self, what: str, coro: Any) -> bool:
        try:
            await coro
        except VonageApiError as exc:
            if exc.status == 404:  # Vonage does not know the call (any more): it is over
                return False
            raise VonageApiError(exc.status, f"Vonage {what} failed") from None
        except ValueError as exc:  # a target or call id Vonage cannot take: nothing was sent
            raise VonageApiError(0, f"Vonage {what} not sent: {exc}") from None
        return True

    async def hangup(self, call_id: str) -> bool:
        return await self._run("hangup", self.rest.hangup(call_id, base_url=self.region_url))

    async def send_dtmf(self, call_id: str, digits: str) -> bool:
        """Keys into the call over REST (`DtmfControl`): Vonage's stream cannot carry them."""
        return await self._run(
            "dtmf", self.rest.send_dtmf(call_id, digits, base_url=self.region_url)
        )

    async def transfer(
        self,
        call_id: str,
        number: str,
        say: str | None = None,
        *,
        whisper_url: str | None = None,
        dial_action: str | None = None,
    ) -> bool:
        return await self._run(
            "transfer",
            self.rest.transfer_to_number(
                call_id,
                number,
                say=say,
                from_number=self.from_number,
                base_url=self.region_url,
                on_answer=whisper_url,
                event_url=dial_action,
            ),
        )


def _talk(text: str, language: str | None = None) -> dict[str, Any]:
    talk: dict[str, Any] = {"action": "talk", "text": text[:MAX_SAY_CHARS]}
    if language:
        talk["language"] = language
    return talk


def whisper_ncco(text: str, language: str | None = None) -> list[dict[str, Any]]:
    """What an `onAnswer` fetch answers: the briefing, to the answering party alone (in the
    profile's language; Vonage's voices are not the agent's, so no style is named)."""
    return [_talk(text, language)]


def after_dial_ncco(status: str, no_answer_message: str | None) -> list[dict[str, Any]] | None:
    """A synchronous connect's event answered: for a connect no one took, the NCCO the caller
    hears instead (the no-answer line, then the NCCO ends and the call with it); None for any
    other status, or with no line to say (nothing replaces the call: it ends after the
    connect, the last action)."""
    if status not in CONNECT_FAILED or not no_answer_message:
        return None
    return [_talk(no_answer_message)]
