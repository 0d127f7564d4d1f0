"""Telnyx REST call control through the official SDK (`telnyx.AsyncTelnyx`, `carriers` extra).

A call answered with TeXML is a TeXML call: its `CallSid` is also its `call_control_id`
(the start frame's `start.call_control_id`). Hanging up and transferring go through the
TeXML call resource (`POST /texml/Accounts/{account_sid}/Calls/{call_sid}`: `Status=completed`
ends it, `Texml=<Response><Dial>…` replaces the running document, which also ends the stream);
DTMF out has no TeXML form that keeps the stream, so it uses Call Control's `send_dtmf` on the
same id. Outbound calls are TeXML calls too (`POST /texml/Accounts/{account_sid}/Calls` with
the application and the URL Telnyx fetches the TeXML from).

`base_url` is overridable so a fake Telnyx API can stand in; the API key is a secret and
never appears in a repr. `TelnyxCallControl` is the carrier-neutral `CallControl` over it
(hang up, cold or warm transfer with the TeXML inline; the SDK's errors become `TelnyxCallError`).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

import httpx

from livecall.telephony.call_control import CallControlError

__all__ = [
    "CallEnded",
    "TelnyxCallControl",
    "TelnyxCallError",
    "TelnyxControl",
    "after_dial_texml",
    "transfer_texml",
    "whisper_texml",
]

_E164 = re.compile(r"^\+[1-9]\d{6,14}$")
_SIP = re.compile(r"^sips?:[^\s<>\"]{3,256}$")
_DTMF = re.compile(r"^[0-9A-D*#wW]{1,64}$")


class CallEnded(Exception):
    """Telnyx says the call is already over (error 90018): nothing left to control."""


def _check_target(number: str) -> None:
    if not (_E164.match(number) or _SIP.match(number)):
        raise ValueError("a transfer target must be an E.164 number (+15551234567) or a SIP URI")


def _document(response: ET.Element) -> str:
    return '<?xml version="1.0" encoding="UTF-8"?>' + ET.tostring(response, encoding="unicode")


def transfer_texml(
    to: str,
    *,
    caller_id: str | None = None,
    timeout_s: int = 30,
    say: str | None = None,
    whisper_url: str | None = None,
    dial_action: str | None = None,
) -> str:
    """TeXML that (optionally) says `say`, then dials `to` (E.164 or SIP URI), in place of the
    running document.

    Warm (`whisper_url`): the `<Number url>`/`<Sip url>` TeXML runs on the answered leg before
    it is bridged (TeXML's TwiML-compatible noun attribute, fetched with `method`), and
    `dial_action` is the `<Dial action>` Telnyx asks what the caller hears once the dial
    ends (`DialCallStatus`).
    """
    _check_target(to)
    response = ET.Element("Response")
    if say:
        ET.SubElement(response, "Say").text = say
    attrs = {"timeout": str(int(timeout_s))}
    if caller_id:
        _check_target(caller_id)
        attrs["callerId"] = caller_id
    if dial_action:
        attrs |= {"action": dial_action, "method": "POST"}
    dial = ET.SubElement(response, "Dial", attrs)
    noun = {"url": whisper_url, "method": "POST"} if whisper_url else {}
    ET.SubElement(dial, "Sip" if to.startswith("sip") else "Number", noun).text = to
    return _document(response)


def whisper_texml(text: str, language: str | None = None) -> str:
    """The briefing the answered leg hears before it is bridged (`<Say>`, in the profile's
    language; TeXML's voices are not the agent's, so none is named)."""
    response = ET.Element("Response")
    ET.SubElement(response, "Say", {"language": language} if language else {}).text = text
    return _document(response)


def after_dial_texml(dial_status: str, no_answer_message: str | None) -> str:
    """The caller's TeXML once a warm transfer's `<Dial>` ends: hang up after a conversation,
    say `no_answer_message` first when no one took the call."""
    response = ET.Element("Response")
    if dial_status not in ("completed", "answered") and no_answer_message:
        ET.SubElement(response, "Say").text = no_answer_message
    ET.SubElement(response, "Hangup")
    return _document(response)


class TelnyxControl:
    """Hang up, transfer, play DTMF and place outbound calls through Telnyx's REST API."""

    def __init__(
        self,
        api_key: str,
        account_sid: str,
        *,
        base_url: str | None = None,
        timeout: float = 10.0,
        max_retries: int = 2,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        if not api_key or not account_sid:
            raise ValueError("Telnyx call control needs an API key and the account (user) id")
        from telnyx import AsyncTelnyx

        self.account_sid = account_sid
        self._client = AsyncTelnyx(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=max_retries,
            http_client=http_client,
        )

    def __repr__(self) -> str:
        return f"TelnyxControl(account_sid={self.account_sid!r}, api_key=<redacted>)"

    async def aclose(self) -> None:
        await self._client.close()

    async def _call(self, coro: Any) -> Any:
        from telnyx import UnprocessableEntityError

        try:
            return await coro
        except UnprocessableEntityError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            errors = body.get("errors") or []
            if any(str(e.get("code")) == "90018" for e in errors if isinstance(e, dict)):
                raise CallEnded("the call has already ended") from None
            raise

    async def hangup(self, call_sid: str) -> None:
        """End the call (`Status=completed`)."""
        await self._call(
            self._client.texml.accounts.calls.update(
                call_sid, account_sid=self.account_sid, status="completed"
            )
        )

    async def transfer(
        self,
        call_sid: str,
        to: str,
        *,
        caller_id: str | None = None,
        say: str | None = None,
        whisper_url: str | None = None,
        dial_action: str | None = None,
    ) -> None:
        """Dial `to` in place of the stream (the media socket closes, the caller is connected)."""
        texml = transfer_texml(
            to, caller_id=caller_id, say=say, whisper_url=whisper_url, dial_action=dial_action
        )
        await self._call(
            self._client.texml.accounts.calls.update(
                call_sid, account_sid=self.account_sid, texml=texml
            )
        )

    async def send_dtmf(self, call_control_id: str, digits: str) -> None:
        """Play keypad tones to the caller (Call Control `send_dtmf`; w/W pause 0.5/1 s)."""
        if not _DTMF.match(digits):
            raise ValueError("DTMF digits are 0-9, A-D, *, #, w and W (1 to 64 of them)")
        await self._call(self._client.calls.actions.send_dtmf(call_control_id, digits=digits))

    async def dial(
        self,
        *,
        to: str,
        from_: str,
        application_sid: str,
        url: str,
        status_callback: str | None = None,
    ) -> str:
        """Place an outbound TeXML call (Telnyx fetches its TeXML from `url`); its CallSid."""
        _check_target(to)
        # CamelCase keys as the TeXML API takes them. The SDK's `Body` type names snake_case
        # keys, but its transform (keyed by the outer params type) sends `body` as given: the
        # typed keys would reach Telnyx unrenamed, hence the arg-type ignore below.
        body: dict[str, Any] = {
            "ApplicationSid": application_sid,
            "To": to,
            "From": from_,
            "Url": url,
        }
        if status_callback:
            body["StatusCallback"] = status_callback
        # the SDK types `body` as its camel-cased params, but sends it as given: TeXML wants
        # Twilio-style names (From, To, Url), so the dict goes as is
        result = await self._call(
            self._client.texml.accounts.calls.calls(self.account_sid, body=body)  # type: ignore[arg-type]
        )
        sid = getattr(result, "call_sid", None) or getattr(result, "sid", None)
        if not isinstance(sid, str) or not sid:
            raise RuntimeError("Telnyx did not return a CallSid for the new call")
        return sid


class TelnyxCallError(CallControlError):
    """Telnyx refused a control request or could not be reached (status and error title)."""


class TelnyxCallControl:
    """`CallControl` for calls answered with TeXML: hang up, cold or warm transfer (`<Number
    url>` briefs the answered leg, `<Dial action>` tells the caller when no one took it)."""

    warm_transfer = True
    transfer_refusal: str | None = None

    def briefs(self, number: str) -> bool:
        return True  # numbers and SIP URIs alike

    def __init__(self, control: TelnyxControl) -> None:
        self.control = control

    def __repr__(self) -> str:
        return f"TelnyxCallControl({self.control!r})"

    async def aclose(self) -> None:
        await self.control.aclose()

    async def _run(self, what: str, coro: Any) -> bool:
        from telnyx import APIConnectionError, APIStatusError, NotFoundError

        try:
            await coro
        except CallEnded:
            return False
        except NotFoundError:  # Telnyx does not know the call (any more)
            return False
        except APIStatusError as exc:
            raise TelnyxCallError(f"Telnyx {what} failed: HTTP {exc.status_code}") from None
        except APIConnectionError as exc:
            raise TelnyxCallError(f"Telnyx {what} failed: {type(exc).__name__}") from None
        except ValueError as exc:  # a target TeXML cannot dial: nothing was sent
            raise TelnyxCallError(f"Telnyx {what} not sent: {exc}") from None
        return True

    async def hangup(self, call_id: str) -> bool:
        return await self._run("hangup", self.control.hangup(call_id))

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
            self.control.transfer(
                call_id, number, say=say, whisper_url=whisper_url, dial_action=dial_action
            ),
        )
