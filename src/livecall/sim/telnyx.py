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

The script, clock, playout and measurements are `livecall.sim.twilio.SimulatedCaller`'s
(same actions, same `CallResult`): this class swaps only the carrier's side of the wire.
Its `CallResult.call_sid` is the call_control_id, `account_sid` the user_id, `stream_sid`
the stream_id and `twiml` the TeXML.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import secrets
import uuid
import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import orjson
import websockets
from websockets.asyncio.client import connect

from livecall.audio.g711 import ulaw_decode
from livecall.carriers.telnyx.signatures import sign_webhook
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
    TimedName,
    TimelineEvent,
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

    def __init__(
        self,
        base_url: str,
        *,
        private_key: bytes,
        call_sid: str | None = None,
        account_sid: str | None = None,
        webhook_path: str = "/texml",
        stamp_skew_s: int = 0,
        replay_webhook: bool = False,
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
        self.replay_webhook = replay_webhook
        self.call_session_id = str(uuid.uuid4())
        self._rtp_mode = False
        self._stream_codec = "PCMU"
        self.webhook_statuses: list[int] = []

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

    def _signed(self, body: bytes) -> dict[str, str]:
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "User-Agent": "Telnyx Webhooks",
            "Accept": "*/*",
        }
        if self.sign:
            stamp = int(datetime.now(UTC).timestamp()) + self.stamp_skew_s
            headers.update(sign_webhook(self._private_key, body, stamp))
        return headers

    async def _post(self, url: str, params: dict[str, str]) -> httpx.Response:
        body = urlencode(params).encode()
        headers = self._signed(body)
        assert self._client is not None
        resp = await self._client.post(url, content=body, headers=headers)
        if self.replay_webhook and url == self.webhook_url:
            self.webhook_statuses.append(resp.status_code)
            resp = await self._client.post(url, content=body, headers=headers)
        self.webhook_statuses.append(resp.status_code)
        return resp

    async def _webhook(self) -> bool:
        r = self.result
        try:
            resp = await self._post(self.webhook_url, self._call_params("ringing"))
        except httpx.HTTPError as exc:
            r.protocol_errors.append(f"TeXML fetch failed: {type(exc).__name__}")
            r.ended_by = "server"
            return False
        r.webhook_status = resp.status_code
        r.twiml = resp.text
        if resp.status_code != 200:
            r.protocol_errors.append(f"TeXML fetch failed: status {resp.status_code}")
            r.ended_by = "server"
            return False
        ctype = resp.headers.get("content-type", "")
        if "xml" not in ctype:
            r.protocol_errors.append(f"TeXML fetch returned content type {ctype!r}, not XML")
            r.ended_by = "server"
            return False
        return self._read_twiml(resp.content)

    def _read_connect(self, connect_el: ET.Element, after: list[ET.Element]) -> bool:
        r = self.result
        stream = connect_el.find("Stream")
        if stream is None:
            r.script_errors.append("<Connect> without <Stream> is not simulated")
            r.ended_by = "server"
            return False
        url = stream.get("url", "")
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.netloc:
            r.protocol_errors.append(f"<Stream> url is not an absolute ws(s):// URL: {url!r}")
            r.ended_by = "server"
            return False
        if self.require_wss and parts.scheme != "wss":
            r.protocol_errors.append(f"<Stream> url must use wss://: {url!r}")
            r.ended_by = "server"
            return False
        track = stream.get("track", "inbound_track")
        if track not in ("inbound_track", "outbound_track", "both_tracks"):
            r.protocol_errors.append(f"<Stream> track {track!r} is not a Telnyx track")
            r.ended_by = "server"
            return False
        mode = stream.get("bidirectionalMode", "mp3")
        if mode not in ("mp3", "rtp"):
            r.protocol_errors.append(f"<Stream> bidirectionalMode {mode!r} is not mp3 or rtp")
            r.ended_by = "server"
            return False
        self._rtp_mode = mode == "rtp"
        codec = stream.get("codec", "default")
        back = stream.get("bidirectionalCodec", "PCMU")
        rate = stream.get("bidirectionalSamplingRate", "8000")
        if codec not in ("PCMU", "default") or back != "PCMU" or rate != "8000":
            r.script_errors.append(
                f"the simulator carries PCMU 8 kHz only (codec={codec}, "
                f"bidirectionalCodec={back}, bidirectionalSamplingRate={rate})"
            )
            r.ended_by = "server"
            return False
        r.stream_url = url
        r.parameters = {
            p.get("name", ""): p.get("value", "")
            for p in stream.findall("Parameter")
            if p.get("name")
        }
        self._status_callback = stream.get("statusCallback")
        self._stream_name = stream.get("name")
        self._connect_action = None  # TeXML goes on with the verbs after <Connect>
        self._after_connect = after
        return True

    # ------------------------------------------------------------------ stream

    async def _open_stream(self) -> bool:
        r = self.result
        url = r.stream_url
        assert url is not None
        self._stream_sid = str(uuid.uuid4())
        try:
            self._ws = await connect(
                url,
                compression=None,
                proxy=None,
                ping_interval=None,
                open_timeout=10,
                close_timeout=2,
                max_size=self.max_message_bytes,
            )
        except websockets.InvalidStatus as exc:
            r.protocol_errors.append(f"stream WebSocket refused: status {exc.response.status_code}")
        except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
            r.protocol_errors.append(f"stream WebSocket failed: {exc!r}")
        if self._ws is None:
            self._stream_status("stream-error", r.protocol_errors[-1])
            r.ended_by = "server"
            return False
        r.stream_sid = self._stream_sid
        sid_json = orjson.dumps(self._stream_sid).decode()
        # The parent's media template: pre + seq + mid + chunk + timestamp + payload.
        self._media_pre = '{"event":"media","sequence_number":"'
        self._media_mid = f'","stream_id":{sid_json},"media":{{"track":"inbound","chunk":"'
        return True

    def _envelope(self, event: str, body: dict[str, Any] | None = None) -> str:
        msg: dict[str, Any] = {
            "event": event,
            "sequence_number": str(self._next_seq()),
            "stream_id": self._stream_sid,
        }
        if event == "dtmf":
            assert body is not None
            msg["occurred_at"] = datetime.now(UTC).isoformat()
            msg["dtmf"] = {"digit": body["digit"]}
        elif event == "stop":
            msg["stop"] = {"user_id": self.account_sid, "call_control_id": self.call_sid}
        elif body is not None:
            msg[event] = body
        return orjson.dumps(msg).decode()

    async def _stream(self) -> None:
        ws = self._ws
        assert ws is not None
        r = self.result
        loop = asyncio.get_running_loop()
        reader: asyncio.Task[None] | None = None
        try:
            await ws.send('{"event":"connected","version":"1.0.0"}')
            start = {
                "user_id": self.account_sid,
                "call_control_id": self.call_sid,
                "call_session_id": self.call_session_id,
                "from": self.from_,
                "to": self.to,
                "tags": [],
                "custom_parameters": r.parameters,
                "media_format": {"encoding": "PCMU", "sample_rate": SAMPLE_RATE, "channels": 1},
            }
            await ws.send(self._envelope("start", start))
            r.stream_started = loop.time()
            self._stream_status("stream-started")
            reader = loop.create_task(self._reader())
            await self._clock(r.stream_started)
        except websockets.ConnectionClosed:
            self._server_ended()
        finally:
            if reader is not None:
                if self.result.ended_by == "caller":
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(reader), 2.5)
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
            r.close_code = ws.close_code
            r.close_reason = ws.close_reason or ""
            self._stream_status("stream-stopped")

    # ------------------------------------------------------------------ what the app sends

    async def _reject(self, code: int, title: str, detail: str) -> None:
        """Record a frame Telnyx would refuse and tell the app, as Telnyx does."""
        self._error(f"{code} {title}: {detail}")
        assert self._ws is not None
        with contextlib.suppress(websockets.ConnectionClosed):
            await self._ws.send(
                self._envelope("error", {"code": code, "title": title, "detail": detail})
            )

    async def _on_frame(self, data: str | bytes, now: float) -> None:
        if not isinstance(data, str):
            await self._reject(100003, "malformed_frame", "binary frames are not accepted")
            return
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            await self._reject(100003, "malformed_frame", "not valid JSON")
            return
        if type(msg) is not dict:
            await self._reject(100003, "malformed_frame", "not a JSON object")
            return
        event = msg.get("event")
        allowed = _ALLOWED_KEYS.get(event) if type(event) is str else None
        if allowed is None:
            await self._reject(100003, "malformed_frame", f"unsupported event {str(event)[:40]!r}")
            return
        sid = msg.get("stream_id")
        if sid is not None and sid != self._stream_sid:
            await self._reject(
                100003, "malformed_frame", f"stream_id {str(sid)[:40]!r} is not this stream's"
            )
            return
        if self.strict_fields and not allowed.issuperset(msg):
            extra = sorted(set(msg) - allowed)
            await self._reject(100003, "malformed_frame", f"unexpected fields {extra} in {event}")
            return
        if event == "media":
            await self._on_telnyx_media(msg, now)
        elif event == "mark":
            body = msg.get("mark")
            name = body.get("name") if type(body) is dict else None
            if type(name) is not str or not name:
                await self._reject(100003, "malformed_frame", "mark needs a non-empty mark.name")
                return
            self.result.marks_received.append(TimedName(name, now))
            self._marks.append((self._enqueued, name))
        else:  # clear
            self.result.clears.append(now)
            self.result.timeline.append(TimelineEvent(now, "clear"))
            self._playbuf.clear()
            self._enqueued = self._played
            if self._marks:
                names = [name for _, name in self._marks]
                self._marks.clear()
                await self._echo_marks(names, now)

    async def _on_telnyx_media(self, msg: dict[str, Any], now: float) -> None:
        if not self._rtp_mode:
            await self._reject(
                100004, "invalid_media", "the stream is in mp3 mode: RTP payloads are not played"
            )
            return
        body = msg.get("media")
        payload = body.get("payload") if type(body) is dict else None
        if type(body) is not dict or type(payload) is not str:
            await self._reject(100003, "malformed_frame", "media needs a string media.payload")
            return
        if self.strict_fields and len(body) != 1:
            await self._reject(100003, "malformed_frame", f"unexpected fields {sorted(body)}")
            return
        try:
            audio = binascii.a2b_base64(payload, strict_mode=True)
        except (binascii.Error, ValueError):
            await self._reject(100004, "invalid_media", "media.payload is not valid base64")
            return
        if not MIN_CHUNK_BYTES <= len(audio) <= MAX_CHUNK_BYTES:
            await self._reject(
                100004,
                "invalid_media",
                f"a chunk of {len(audio) / 8:g} ms is outside 20 ms..30 s",
            )
            return
        self._playbuf += audio
        self._enqueued += len(audio)
        self.result.received_media_bytes += len(audio)
        if self._probes:
            for _ in range(self._detector.feed(ulaw_decode(audio))):
                self._probe_heard(now)
