"""A simulated Telnyx media edge: one phone caller through a TeXML application.

`TelnyxSimulatedCaller` does what Telnyx does for an inbound call to a TeXML app answering
with `<Connect><Stream bidirectionalMode="rtp">`: POSTs the voice webhook as a form, signed
with Ed25519 (`telnyx-signature-ed25519` over `"{telnyx-timestamp}|{body}"`), reads the TeXML,
opens the WebSocket its `<Stream url>` names (unsigned: TeXML gives the upgrade no auth
header), sends `connected`, `start` (snake case, `stream_id` at the top level,
`start.call_control_id`, the `<Parameter>`s as `custom_parameters`) and then one 20 ms PCMU
`media` frame per tick on an absolute clock, `dtmf` for key presses and `stop` on hang-up.
It plays what the app sends back on a real-time playout timeline: `media` queues audio,
`mark` comes back once what was queued before it has played (at once when nothing is
queued), `clear` empties the queue and returns the queued marks.

Strict where Telnyx is: binary frames, bad JSON, unknown events, a foreign `stream_id`,
bad base64, a media chunk outside 20 ms..30 s, media while the stream is not in RTP mode:
each is recorded in `CallResult.protocol_errors` and answered with an `error` frame, never a
crash. The error codes (100002 unknown_error, 100003 malformed_frame, 100004 invalid_media)
follow Telnyx's media streaming guide as far as its public pages show them.

The script, clock, playout and measurements are `livecall.sim.edge.SimulatedEdge`'s (same
actions, same `CallResult`), and TeXML, Twilio's dialect, is read by `SimulatedCaller`'s TwiML
reader: this class swaps only Telnyx's side of the wire (signing, `<Stream>` attributes,
frames, refusals).
Its `CallResult.call_sid` is the call_control_id, `account_sid` the user_id, `stream_sid`
the stream_id and `twiml` the TeXML.
"""

from __future__ import annotations

import binascii
import contextlib
import secrets
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar

import orjson
import websockets
from websockets.asyncio.client import ClientConnection

from livecall.carriers.telnyx.signatures import sign_webhook
from livecall.sim.edge import RefusalKind
from livecall.sim.twilio import (
    SAMPLE_RATE,
    CallResult,
    HangUp,
    Pause,
    PressDigit,
    Probe,
    Say,
    ScriptAction,
    SendRaw,
    SimulatedCaller,
    WaitForAgentAudio,
    WaitForAgentSilence,
)

__all__ = [
    "CallResult",
    "HangUp",
    "Pause",
    "PressDigit",
    "Probe",
    "Say",
    "ScriptAction",
    "SendRaw",
    "TelnyxSimulatedCaller",
    "WaitForAgentAudio",
    "WaitForAgentSilence",
    "generate_keypair",
]

MIN_CHUNK_BYTES = SAMPLE_RATE * 20 // 1000  # 20 ms of PCMU
MAX_CHUNK_BYTES = SAMPLE_RATE * 30  # 30 s of PCMU
_ALLOWED_KEYS = {
    "media": frozenset(("event", "stream_id", "media")),
    "mark": frozenset(("event", "stream_id", "mark")),
    "clear": frozenset(("event", "stream_id")),
}
_MEDIA_KEYS = frozenset(("payload",))
_ERRORS = {"media": (100004, "invalid_media")}
_MALFORMED = (100003, "malformed_frame")


def generate_keypair() -> tuple[bytes, str]:
    """A fresh Ed25519 key: (private seed for the simulator, base64 public key for the app)."""
    from nacl.signing import SigningKey

    key = SigningKey.generate()
    public = binascii.b2a_base64(bytes(key.verify_key), newline=False).decode()
    return bytes(key), public


class TelnyxSimulatedCaller(SimulatedCaller):
    """One simulated inbound call through Telnyx to a TeXML `<Connect><Stream>` app.

    Takes `SimulatedCaller`'s arguments (script, frame drops, jitter, timeouts…) except the
    Twilio auth token: `private_key` is the Ed25519 seed Telnyx signs webhooks with (the app
    verifies with its public key). `stamp_skew_s` shifts the signature timestamp (expired
    and future signatures); `replay_webhook` sends the very same signed request twice.
    """

    FETCH_FAILED = "TeXML fetch failed: {why}"
    BAD_CONTENT_TYPE = "TeXML fetch returned content type {ctype!r}, not XML"
    DOCUMENT_TYPES = ("xml",)
    FORM_HEADERS: ClassVar[Mapping[str, str]] = {
        "Content-Type": "application/x-www-form-urlencoded",
        "User-Agent": "Telnyx Webhooks",
        "Accept": "*/*",
    }
    SEQ_KEY = "sequence_number"
    STREAM_URL_INVALID = "<Stream> url is not an absolute ws(s):// URL: {url!r}"
    STREAM_URL_NOT_WSS = "<Stream> url must use wss://: {url!r}"
    WS_REFUSED = "stream WebSocket refused: status {status}"
    WS_FAILED = "stream WebSocket failed: {exc!r}"
    STREAM_USER_AGENT = None
    SID_KEYS = ("stream_id",)
    SID_REQUIRED = frozenset()  # none of the app's frames needs the stream_id
    SID_MISMATCH = "{key} {sid!r} is not this stream's"

    def __init__(
        self,
        base_url: str,
        *,
        private_key: bytes,
        call_sid: str | None = None,
        account_sid: str | None = None,
        webhook_path: str = "/texml",
        stamp_skew_s: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            base_url,
            auth_token="unused-by-telnyx",
            call_sid=call_sid or "v3:" + secrets.token_urlsafe(33),
            account_sid=account_sid or str(uuid.uuid4()),
            webhook_path=webhook_path,
            **kwargs,
        )
        if len(private_key) != 32:
            raise ValueError("private_key is the 32-byte Ed25519 seed")
        self._private_key = private_key
        self.stamp_skew_s = stamp_skew_s
        self.call_session_id = str(uuid.uuid4())
        self._rtp_mode = False

    # ------------------------------------------------------------------ webhook + TeXML

    def _call_params(self, status: str) -> dict[str, str]:
        params = {
            "AccountSid": self.account_sid,
            "CallSid": self.call_sid,
            "CallSidLegacy": self.call_sid,
            "CallSessionId": self.call_session_id,
            "CallStatus": status,
            "ConnectionId": "1494404757140276705",
            "Direction": "inbound",
            "From": self.from_,
            "To": self.to,
        }
        params.update(self.extra_params)
        return params

    def _signature(self, url: str, params: Mapping[str, str], body: bytes) -> dict[str, str]:
        stamp = int(datetime.now(UTC).timestamp()) + self.stamp_skew_s
        return sign_webhook(self._private_key, body, stamp)

    def _read_connect(self, connect_el: ET.Element, after: list[ET.Element]) -> bool:
        stream = self._connect_stream(connect_el)
        if stream is None:
            return False
        url = stream.get("url", "")
        if not self._stream_url_ok(url):
            return False
        track = stream.get("track", "inbound_track")
        if track not in ("inbound_track", "outbound_track", "both_tracks"):
            return self._fail(f"<Stream> track {track!r} is not a Telnyx track")
        mode = stream.get("bidirectionalMode", "mp3")
        if mode not in ("mp3", "rtp"):
            return self._fail(f"<Stream> bidirectionalMode {mode!r} is not mp3 or rtp")
        self._rtp_mode = mode == "rtp"
        codec = stream.get("codec", "default")
        back = stream.get("bidirectionalCodec", "PCMU")
        rate = stream.get("bidirectionalSamplingRate", "8000")
        if codec not in ("PCMU", "default") or back != "PCMU" or rate != "8000":
            self.result.script_errors.append(
                f"the simulator carries PCMU 8 kHz only (codec={codec}, "
                f"bidirectionalCodec={back}, bidirectionalSamplingRate={rate})"
            )
            self.result.ended_by = "server"
            return False
        # no <Connect action>: TeXML goes on with the verbs after <Connect>
        return self._stream_connected(stream, url, after)

    # ------------------------------------------------------------------ stream

    def _new_stream_sid(self) -> str:
        return str(uuid.uuid4())

    def _stream_headers(self, url: str) -> dict[str, str]:
        return {}  # TeXML gives the upgrade no auth header

    def _stream_opened(self) -> None:
        sid_json = orjson.dumps(self._stream_sid).decode()
        # Twilio's media template (pre + seq + mid + chunk + timestamp + payload), snake case.
        self._media_pre = '{"event":"media","sequence_number":"'
        self._media_mid = f'","stream_id":{sid_json},"media":{{"track":"inbound","chunk":"'

    def _envelope(self, event: str, body: dict[str, Any] | None = None) -> str:
        if event == "dtmf" and body is not None:
            occurred = {"occurred_at": datetime.now(UTC).isoformat()}
            return self._frame(event, {"digit": body["digit"]}, occurred)
        return self._frame(event, body)

    def _stop_frame(self) -> str | None:
        stop = {"user_id": self.account_sid, "call_control_id": self.call_sid}
        return self._envelope("stop", stop)

    async def _hello(self, ws: ClientConnection) -> None:
        await ws.send('{"event":"connected","version":"1.0.0"}')
        start = {
            "user_id": self.account_sid,
            "call_control_id": self.call_sid,
            "call_session_id": self.call_session_id,
            "from": self.from_,
            "to": self.to,
            "tags": [],
            "custom_parameters": self.result.parameters,
            "media_format": {"encoding": "PCMU", "sample_rate": SAMPLE_RATE, "channels": 1},
        }
        await ws.send(self._envelope("start", start))

    # ------------------------------------------------------------------ what the app sends

    async def _refuse(self, detail: str, kind: RefusalKind = "invalid") -> None:
        """Record a frame Telnyx would refuse and tell the app, as Telnyx does."""
        code, title = _ERRORS.get(kind, _MALFORMED)
        self._error(f"{code} {title}: {detail}")
        assert self._ws is not None
        with contextlib.suppress(websockets.ConnectionClosed):
            await self._ws.send(
                self._envelope("error", {"code": code, "title": title, "detail": detail})
            )

    async def _on_frame(self, data: str | bytes, now: float) -> None:
        read = await self._read_json(data, _ALLOWED_KEYS)
        if read is None:
            return
        event, msg = read
        if event == "media":
            if not self._rtp_mode:
                await self._refuse(
                    "the stream is in mp3 mode: RTP payloads are not played", "media"
                )
                return
            audio = await self._media_payload(msg, _MEDIA_KEYS)
            if audio is None:
                return
            if not MIN_CHUNK_BYTES <= len(audio) <= MAX_CHUNK_BYTES:
                await self._refuse(
                    f"a chunk of {len(audio) / 8:g} ms is outside 20 ms..30 s", "media"
                )
                return
            self._queue_audio(audio, now)
        elif event == "mark":
            name = await self._mark_name(msg)
            if name is not None:
                self._queue_mark(name, now)
        else:  # clear
            await self._clear_queue(now)
