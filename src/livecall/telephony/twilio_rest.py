"""Controlling live calls through Twilio's REST API: hang up, transfer, place outbound calls.

A thin async face over the official `twilio` client. The SDK's calls block (it uses
`requests`), so each runs in a worker thread and the event loop carrying the audio never
waits on Twilio. ``base_url`` points the client's ``api`` domain elsewhere (the REST
simulator in tests). The auth token is handed to the SDK and nowhere else: errors raised from
here carry Twilio's status, code and message, never credentials.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client
from twilio.twiml.voice_response import VoiceResponse

from livecall.log import get_logger, register_secret
from livecall.privacy import mask_number
from livecall.telephony.call_control import CallControlError

__all__ = [
    "TwilioCallControl",
    "TwilioCallError",
    "outbound_stream_twiml",
    "transfer_twiml",
]

log = get_logger("livecall.twilio_rest")

# The SDK logs every request and response at INFO; give it a logger of ours, quiet by default.
_sdk_logger = logging.getLogger("livecall.twilio_sdk")
_sdk_logger.setLevel(logging.WARNING)

NOT_FOUND_CODE = 20404
_SIP = re.compile(r"^sips?:", re.IGNORECASE)


class TwilioCallError(CallControlError):
    """Twilio refused a request (or could not be reached); `status`/`code` say why."""

    def __init__(self, message: str, status: int | None = None, code: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def transfer_twiml(
    target: str,
    say: str | None = None,
    caller_id: str | None = None,
    *,
    whisper_url: str | None = None,
    dial_action: str | None = None,
) -> str:
    """TwiML that (optionally) says something, then dials a number or a ``sip:`` address.

    With `whisper_url` (a warm transfer) Twilio fetches that URL when the callee answers and
    plays what it returns to the callee alone before bridging (``<Number url>``/``<Sip url>``).
    `dial_action` is where Twilio asks what the caller hears once the ``<Dial>`` ends
    (``DialCallStatus``): without it a caller still on the line would fall through to
    whatever follows, after a conversation as much as after no answer.
    """
    response = VoiceResponse()
    if say:
        response.say(say)
    dial_attrs: dict[str, str] = {}
    if caller_id:
        dial_attrs["caller_id"] = caller_id
    if dial_action:
        dial_attrs |= {"action": dial_action, "method": "POST"}
    dial = response.dial(**dial_attrs)
    noun = {"url": whisper_url, "method": "POST"} if whisper_url else {}
    if _SIP.match(target):
        dial.sip(target, **noun)
    else:
        dial.number(target, **noun)
    return str(response)


def outbound_stream_twiml(stream_url: str, parameters: Mapping[str, str]) -> str:
    """``<Connect><Stream url>`` with one ``<Parameter>`` per entry (the stream URL has no query:
    Twilio rejects one, so per-call values travel as parameters)."""
    parts = urlsplit(stream_url)
    if parts.scheme not in ("wss", "ws") or not parts.netloc:
        raise ValueError(f"stream URL must be wss://host/path, got {stream_url!r}")
    if parts.query:
        raise ValueError("the stream URL must not carry a query string: use parameters instead")
    response = VoiceResponse()
    connect = response.connect()
    stream = connect.stream(url=stream_url)
    for name, value in parameters.items():
        stream.parameter(name=name, value=str(value))
    return str(response)


class TwilioCallControl:
    """Hang up, transfer and create calls on one Twilio account (a `CallControl`)."""

    warm_transfer = True  # `<Number url>` plays the callee a briefing before bridging
    transfer_refusal: str | None = None

    def briefs(self, number: str) -> bool:
        return True  # numbers and SIP URIs alike

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        base_url: str | None = None,
        *,
        timeout_s: float = 15.0,
    ) -> None:
        if not account_sid or not auth_token:
            raise ValueError("TwilioCallControl needs an account SID and an auth token")
        register_secret(auth_token)
        self.account_sid = account_sid
        self._client = Client(
            account_sid,
            auth_token,
            http_client=TwilioHttpClient(timeout=timeout_s, logger=_sdk_logger),
        )
        if base_url:
            # The supported seam: every REST call is built from its domain's `base_url`.
            # Region/edge rewriting (from TWILIO_REGION/TWILIO_EDGE) would undo it: off.
            self._client.api.base_url = base_url.rstrip("/")
            self._client.region = None
            self._client.edge = None
        self.base_url = self._client.api.base_url

    def __repr__(self) -> str:
        return f"TwilioCallControl(account_sid={self.account_sid!r}, base_url={self.base_url!r})"

    async def _run(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except TwilioRestException as exc:
            raise TwilioCallError(
                f"Twilio {what} failed: HTTP {exc.status}"
                + (f" (code {exc.code})" if exc.code else "")
                + f": {exc.msg}",
                status=exc.status,
                code=exc.code,
            ) from None
        except (TwilioException, OSError) as exc:
            raise TwilioCallError(f"Twilio {what} failed: {type(exc).__name__}") from None
        except Exception as exc:  # requests' connection errors and the like
            if type(exc).__module__.startswith(("requests", "urllib3")):
                raise TwilioCallError(f"Twilio {what} failed: {type(exc).__name__}") from None
            raise

    async def _update(self, call_sid: str, what: str, **kwargs: Any) -> bool:
        """`calls(sid).update(**kwargs)`; False when the call no longer exists (20404)."""
        try:
            await self._run(what, self._client.calls(call_sid).update, **kwargs)
        except TwilioCallError as exc:
            if exc.status == 404 or exc.code == NOT_FOUND_CODE:
                log.info("twilio.call_already_ended", call_sid=call_sid, action=what)
                return False
            raise
        return True

    async def hangup(self, call_sid: str) -> bool:
        """End the call; False if it had already ended (Twilio's 404/20404), True otherwise."""
        done = await self._update(call_sid, "hangup", status="completed")
        if done:
            log.info("twilio.hangup", call_sid=call_sid)
        return done

    async def transfer(
        self,
        call_sid: str,
        target: str,
        say: str | None = None,
        *,
        caller_id: str | None = None,
        whisper_url: str | None = None,
        dial_action: str | None = None,
    ) -> bool:
        """Redirect the call to new TwiML that dials `target` (E.164 or ``sip:``).

        Returns False if the call had already ended. The stream to livecall ends when Twilio
        leaves the ``<Connect>``, which is how the bridge learns the transfer took effect.
        """
        twiml = transfer_twiml(
            target, say, caller_id, whisper_url=whisper_url, dial_action=dial_action
        )
        done = await self._update(call_sid, "transfer", twiml=twiml)
        if done:
            log.info("twilio.transfer", call_sid=call_sid, target=target, warm=bool(whisper_url))
        return done

    async def create_outbound(
        self,
        to: str,
        from_: str,
        stream_url: str,
        parameters: Mapping[str, str],
        *,
        machine_detection: bool = False,
        status_callback: str | None = None,
        amd_callback: str | None = None,
        status_callback_events: list[str] | None = None,
        time_limit_s: int | None = None,
    ) -> str:
        """Place a call that streams to livecall as soon as it is answered; returns its sid.

        With `machine_detection`, Twilio runs answering-machine detection in the background
        (``DetectMessageEnd``, async) and POSTs ``AnsweredBy`` to `amd_callback` (or to
        `status_callback` when no separate URL is given), so the agent can leave a voicemail
        after the beep instead of talking over the greeting.
        """
        twiml = outbound_stream_twiml(stream_url, parameters)
        kwargs: dict[str, Any] = {"to": to, "from_": from_, "twiml": twiml}
        if status_callback:
            kwargs["status_callback"] = status_callback
            if status_callback_events:
                kwargs["status_callback_event"] = status_callback_events
        if machine_detection:
            callback = amd_callback or status_callback
            if not callback:
                raise ValueError("machine_detection needs amd_callback (or status_callback)")
            kwargs |= {
                "machine_detection": "DetectMessageEnd",
                "async_amd": "true",
                "async_amd_status_callback": callback,
                "async_amd_status_callback_method": "POST",
            }
        if time_limit_s is not None:
            kwargs["time_limit"] = int(time_limit_s)
        call = await self._run("create call", self._client.calls.create, **kwargs)
        log.info(
            "twilio.outbound_created", call_sid=call.sid, to=mask_number(to), amd=machine_detection
        )
        return str(call.sid)

    async def status(self, call_sid: str) -> str | None:
        """The call's current status (``in-progress``, ``completed``…), None if unknown."""
        try:
            call = await self._run("fetch call", self._client.calls(call_sid).fetch)
        except TwilioCallError as exc:
            if exc.status == 404:
                return None
            raise
        return str(call.status) if call.status is not None else None
