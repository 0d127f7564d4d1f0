"""A simulated Twilio media edge: one phone caller, faithful to Twilio's side of the wire.

`SimulatedCaller` does what Twilio does for an inbound call to a `<Connect><Stream>` app:
POSTs the signed voice webhook, reads the TwiML, opens the signed WebSocket to the
`<Stream>` URL, sends `connected`, `start` and then one `media` frame every 20 ms on an
absolute clock (silence between utterances, as a real line never goes quiet), and plays
what the app sends back through a real-time playout buffer that honours `mark` and `clear`
like Twilio. It is strict where Twilio is strict: a frame Twilio would reject (binary,
bad JSON, unknown event, wrong streamSid, bad base64, missing or extra fields) is recorded
as a protocol error (31950/31951) and ignored, never a crash.

The script, clock, playout and measurements are `livecall.sim.edge.SimulatedEdge`'s and the
actions and result `livecall.sim.script`'s (re-exported here, where suites import them from);
this module holds only Twilio's side: its webhook and signatures, TwiML, and its frames.
"""

from __future__ import annotations

import asyncio
import binascii
import secrets
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import urljoin

import httpx
import orjson
from websockets.asyncio.client import ClientConnection

from livecall.sim.edge import RefusalKind, SimulatedEdge
from livecall.sim.edge_parts import (
    FormAnswerEdge,
    FrameMediaEdge,
    JsonEnvelopeEdge,
    OneSocketEdge,
)
from livecall.sim.script import (
    SAMPLE_RATE,
    CallResult,
    HangUp,
    Pause,
    PressDigit,
    Probe,
    Say,
    ScriptAction,
    SendRaw,
    TimedName,
    TimelineEvent,
    Utterance,
    WaitForAgentAudio,
    WaitForAgentSilence,
)
from livecall.telephony.twilio import SIGNATURE_SETTINGS_HEADER, TwilioSignature

__all__ = [
    "SAMPLE_RATE",
    "CallResult",
    "HangUp",
    "Pause",
    "PressDigit",
    "Probe",
    "Say",
    "ScriptAction",
    "SendRaw",
    "SimulatedCaller",
    "TimedName",
    "TimelineEvent",
    "Utterance",
    "WaitForAgentAudio",
    "WaitForAgentSilence",
]

_ALLOWED_KEYS = {
    "media": frozenset(("event", "streamSid", "media")),
    "mark": frozenset(("event", "streamSid", "mark")),
    "clear": frozenset(("event", "streamSid")),
}
_MEDIA_KEYS = frozenset(("payload",))


def _sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


class SimulatedCaller(FormAnswerEdge, OneSocketEdge, FrameMediaEdge, JsonEnvelopeEdge):
    """One simulated inbound call through Twilio to a `<Connect><Stream>` app.

    `base_url` is the app's HTTP base; the voice webhook goes to `base_url + webhook_path`
    and the stream goes to whatever `<Stream url>` the TwiML names. `auth_token` signs the
    webhooks and the upgrade; with `shared_key` (a Webhook Rule's SharedKey) Twilio signs with
    it instead, HMAC-SHA256. The other arguments are `SimulatedEdge`'s (script, drops, jitter,
    timeouts…).
    """

    FETCH_FAILED = "11200 HTTP retrieval failure: {why}"
    BAD_CONTENT_TYPE = "12300 Invalid Content-Type: {ctype!r}"
    DOCUMENT_TYPES: ClassVar[tuple[str, ...]] = ("xml", "html")
    XML_INVALID = "12100 Document parse failure: {why}"
    FORM_HEADERS: ClassVar[Mapping[str, str]] = {
        "Content-Type": "application/x-www-form-urlencoded; charset=UTF-8",
        "User-Agent": "TwilioProxy/1.1",
        "Accept": "*/*",
    }
    SEQ_KEY: ClassVar[str] = "sequenceNumber"
    STREAM_URL_INVALID = "31920 Stream url is not an absolute wss:// URL: {url!r}"
    STREAM_URL_NOT_WSS = "31910 Stream url must use wss://: {url!r}"
    WS_REFUSED = "31920 Stream - WebSocket - Handshake Error: status {status}"
    WS_FAILED = "31901 Stream - WebSocket - Connection failed: {exc!r}"
    STREAM_USER_AGENT: ClassVar[str | None] = "Twilio.TmeWs/1.0"
    SID_REQUIRED = frozenset(_ALLOWED_KEYS)  # Twilio refuses a frame without the streamSid
    SID_MISSING = SimulatedEdge.SID_MISMATCH

    def __init__(
        self,
        base_url: str,
        *,
        auth_token: str,
        call_sid: str | None = None,
        account_sid: str | None = None,
        webhook_path: str = "/twiml",
        shared_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            base_url,
            call_sid=call_sid or _sid("CA"),
            account_sid=account_sid or _sid("AC"),
            webhook_path=webhook_path,
            **kwargs,
        )
        # A Webhook Rule's SharedKey: Twilio then signs with it, HMAC-SHA256, and says so in
        # X-Twilio-Webhooks-Signature-Settings (webhooks and the stream upgrade alike).
        self._signer = TwilioSignature(shared_key or auth_token)
        self._algorithm = "HMAC_SHA256" if shared_key else None
        self._after_connect: list[ET.Element] = []
        self._connect_action: str | None = None
        self._stream_name: str | None = None
        self._media_pre = ""
        self._media_mid = ""

    # ------------------------------------------------------------------ webhook + TwiML

    def _call_params(self, status: str) -> dict[str, str]:
        params = {
            "AccountSid": self.account_sid,
            "ApiVersion": "2010-04-01",
            "CallSid": self.call_sid,
            "CallStatus": status,
            "Called": self.to,
            "Caller": self.from_,
            "Direction": "inbound",
            "From": self.from_,
            "To": self.to,
        }
        params.update(self.extra_params)
        return params

    def _form_headers(self) -> dict[str, str]:
        return {**self.FORM_HEADERS, "I-Twilio-Idempotency-Token": str(uuid.uuid4())}

    def _signature(self, url: str, params: Mapping[str, str], body: bytes) -> dict[str, str]:
        return self._signature_headers(url, params)

    def _signature_headers(self, url: str, params: Mapping[str, str]) -> dict[str, str]:
        headers = {"X-Twilio-Signature": self._signer.sign(url, params, algorithm=self._algorithm)}
        if self._algorithm is not None:
            headers[SIGNATURE_SETTINGS_HEADER] = (
                f"key=webhooks_sharedkey_sim,algorithm={self._algorithm}"
            )
        return headers

    def _read_document(self, body: bytes) -> bool:
        return self._read_xml(body, "Connect", self._read_connect, self._run_verb)

    def _run_verb(self, verb: ET.Element) -> bool:
        """Run a non-stream verb; True if it ends the call."""
        r = self.result
        now = asyncio.get_running_loop().time()
        if verb.tag == "Say":
            r.said.append((verb.text or "").strip())
            r.timeline.append(TimelineEvent(now, "twiml_say", r.said[-1]))
            return False
        if verb.tag in ("Pause", "Play"):
            r.timeline.append(TimelineEvent(now, f"twiml_{verb.tag.lower()}"))
            return False
        if verb.tag == "Hangup":
            r.timeline.append(TimelineEvent(now, "twiml_hangup"))
            r.ended_by = "server"
            return True
        if verb.tag == "Reject":
            r.rejected = True
            r.reject_reason = verb.get("reason", "rejected")
            r.timeline.append(TimelineEvent(now, "twiml_reject", r.reject_reason))
            r.ended_by = "server"
            return True
        r.script_errors.append(f"TwiML verb <{verb.tag}> is not simulated; the call ends")
        r.ended_by = "server"
        return True

    def _connect_stream(self, connect_el: ET.Element) -> ET.Element | None:
        """`<Connect>`'s `<Stream>`, or None (recorded: the call ends)."""
        stream = connect_el.find("Stream")
        if stream is None:
            self.result.script_errors.append("<Connect> without <Stream> is not simulated")
            self.result.ended_by = "server"
        return stream

    def _stream_connected(self, stream: ET.Element, url: str, after: list[ET.Element]) -> bool:
        """A `<Stream>` that passed the checks: note its URL, parameters and what follows."""
        r = self.result
        r.stream_url = url
        r.parameters = {
            p.get("name", ""): p.get("value", "")
            for p in stream.findall("Parameter")
            if p.get("name")
        }
        self._status_callback = stream.get("statusCallback")
        self._stream_name = stream.get("name")
        self._after_connect = after
        return True

    def _read_connect(self, connect_el: ET.Element, after: list[ET.Element]) -> bool:
        stream = self._connect_stream(connect_el)
        if stream is None:
            return False
        url = stream.get("url", "")
        if not self._stream_url_ok(url):
            return False
        if "?" in url:
            return self._fail(f"31920 Stream url must not carry a query string: {url!r}")
        self._connect_action = connect_el.get("action")
        return self._stream_connected(stream, url, after)

    async def _after_stream(self) -> None:
        """The app closed the socket: Twilio goes on with <Connect action> or the next verbs."""
        r = self.result
        if self._connect_action:
            url = urljoin(self.webhook_url, self._connect_action)
            try:
                resp = await self._post(url, self._call_params("in-progress"))
                r.action_twiml = resp.text
            except httpx.HTTPError as exc:
                r.protocol_errors.append(f"11200 HTTP retrieval failure (action): {exc!r}")
            return
        for verb in self._after_connect:
            if self._run_verb(verb):
                return

    def _stream_status(self, event: str, error: str | None = None) -> None:
        """Twilio's <Stream statusCallback>: stream-started / stream-stopped / stream-error."""
        if not self._status_callback:
            return
        params = {
            "AccountSid": self.account_sid,
            "CallSid": self.call_sid,
            "StreamSid": self._stream_sid,
            "StreamName": self._stream_name or self._stream_sid,
            "StreamEvent": event,
            "Timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }
        if error:
            params["StreamError"] = error
        self._post_soon(self._status_callback, params)

    # ------------------------------------------------------------------ stream

    def _new_stream_sid(self) -> str:
        return _sid("MZ")

    def _stream_headers(self, url: str) -> dict[str, str]:
        return self._signature_headers(url, {}) if self.sign else {}

    def _stream_opened(self) -> None:
        sid_json = orjson.dumps(self._stream_sid).decode()
        self._media_pre = '{"event":"media","sequenceNumber":"'
        self._media_mid = f'","streamSid":{sid_json},"media":{{"track":"inbound","chunk":"'

    def _envelope(self, event: str, body: dict[str, Any] | None = None) -> str:
        return self._frame(event, body)

    def _frame(
        self, event: str, body: dict[str, Any] | None, top: Mapping[str, Any] | None = None
    ) -> str:
        """`{"event", SEQ_KEY (a digit string), the stream id, **top, event: body}`."""
        msg: dict[str, Any] = {
            "event": event,
            self.SEQ_KEY: str(self._next_seq()),
            self.SID_KEYS[0]: self._stream_sid,
        }
        if top:
            msg.update(top)
        if body is not None:
            msg[event] = body
        return orjson.dumps(msg).decode()

    def _media_message(self, n: int, frame: bytes) -> str:
        """Twilio's `media`, from the template `_stream_opened` made (chunk n, its timestamp)."""
        payload = (
            self._silence_b64
            if frame is self._silence
            else binascii.b2a_base64(frame, newline=False).decode()
        )
        self._seq += 1
        return (
            f'{self._media_pre}{self._seq}{self._media_mid}{n}","timestamp":"'
            f'{(n - 1) * self.frame_ms}","payload":"{payload}"}}}}'
        )

    def _stop_frame(self) -> str | None:
        return self._envelope("stop", {"accountSid": self.account_sid, "callSid": self.call_sid})

    async def _hello(self, ws: ClientConnection) -> None:
        await ws.send('{"event":"connected","protocol":"Call","version":"1.0.0"}')
        start = {
            "accountSid": self.account_sid,
            "streamSid": self._stream_sid,
            "callSid": self.call_sid,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": SAMPLE_RATE, "channels": 1},
            "customParameters": self.result.parameters,
        }
        await ws.send(self._envelope("start", start))

    # ------------------------------------------------------------------ what the app sends

    async def _refuse(self, detail: str, kind: RefusalKind = "invalid") -> None:
        prefix = "31950 Malformed Message" if kind == "binary" else "31951 Invalid Message"
        self._error(f"{prefix}: {detail}")

    async def _on_frame(self, data: str | bytes, now: float) -> None:
        read = await self._read_json(data, _ALLOWED_KEYS)
        if read is None:
            return
        event, msg = read
        if event == "media":
            audio = await self._media_payload(msg, _MEDIA_KEYS)
            if audio is None:
                return
            if not audio:
                await self._refuse("media.payload is empty", "media")
                return
            self._queue_audio(audio, now)
        elif event == "mark":
            name = await self._mark_name(msg)
            if name is None:
                return
            if self.strict_fields and len(msg["mark"]) != 1:
                await self._refuse("unexpected fields in mark")
                return
            self._queue_mark(name, now)
        else:  # clear
            await self._clear_queue(now)
