"""A simulated Plivo media edge: one phone caller through a Plivo XML application.

`PlivoSimulatedCaller` does what Plivo does for an inbound call whose answer URL returns
`<Stream bidirectional="true" keepCallAlive="true">wss://…</Stream>`: POSTs the answer
webhook as a form signed V3 (`X-Plivo-Signature-V3` + `-Nonce`, HMAC-SHA256 with the auth
token over URL + sorted params + "." + nonce), reads the XML, checks the `<Stream>` the way
Plivo's reference states its attributes (bidirectional needs audioTrack inbound; contentType
one of audio/x-l16;rate=8000|16000 or audio/x-mulaw;rate=8000, l16 8 kHz when absent;
extraHeaders at most 512 bytes of letters and digits), opens the WebSocket it names, sends
`start` (no `connected`: Plivo has none; per-call values in `extra_headers` as "k=v;k=v")
and then one 20 ms `media` frame per tick on an absolute clock (numeric `chunk` and
`sequenceNumber`, `timestamp` in epoch milliseconds as a string, as Plivo's reference shows),
`dtmf` for key presses and, on hang-up, `stop` (absent from the current reference but sent
by Plivo's own stacks; `stop_event=False` just closes, as the reference implies).

It plays what the app sends on a real-time playout timeline: `playAudio` queues audio (μ-law
or L16 at 8/16 kHz, converted for the caller's ear), `checkpoint` comes back as
`playedStream` once what was queued before it has played, `clearAudio` empties the queue and
answers `clearedAudio` — and the checkpoints it dropped never come back, since Plivo emits
`playedStream` only for audio that really played. `sendDTMF` is recorded in
`digits_received`. Frames Plivo would not act on (binary, bad JSON, unknown events, a foreign
or missing streamId on checkpoint/clearAudio, a bad contentType/sampleRate, bad base64,
playAudio on a one-way stream) are recorded in `CallResult.protocol_errors`, never a crash;
Plivo documents no error frame, so none is sent back.

The script, clock, playout and measurements are `livecall.sim.edge.SimulatedEdge`'s (same
actions, same `CallResult`): this class supplies only Plivo's side of the wire.
Its `CallResult.call_sid` is the CallUUID, `account_sid` the auth id, `stream_sid` the
streamId and `twiml` the Plivo XML.
"""

from __future__ import annotations

import asyncio
import binascii
import re
import secrets
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import orjson
import soxr
from websockets.asyncio.client import ClientConnection

from livecall.audio.g711 import ulaw_decode, ulaw_encode
from livecall.carriers.plivo.signatures import PlivoSignature, new_nonce
from livecall.sim.edge_parts import (
    FormAnswerEdge,
    FrameMediaEdge,
    JsonEnvelopeEdge,
    OneSocketEdge,
)
from livecall.sim.script import (
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
    WaitForAgentAudio,
    WaitForAgentSilence,
)

__all__ = [
    "CallResult",
    "HangUp",
    "Pause",
    "PlivoSimulatedCaller",
    "PressDigit",
    "Probe",
    "Say",
    "ScriptAction",
    "SendRaw",
    "WaitForAgentAudio",
    "WaitForAgentSilence",
]

CONTENT_TYPES = {
    "audio/x-l16;rate=8000": ("l16", 8000),
    "audio/x-l16;rate=16000": ("l16", 16000),
    "audio/x-mulaw;rate=8000": ("mulaw", 8000),
}
DEFAULT_CONTENT_TYPE = "audio/x-l16;rate=8000"  # Plivo's default when the attribute is absent
_PLAY_RATES = {"audio/x-mulaw": (8000,), "audio/x-l16": (8000, 16000)}
_ALNUM = re.compile(r"[A-Za-z0-9]+")
_SEND_DTMF = re.compile(r"[0-9*#]{1,32}")
_ALLOWED_KEYS = {
    "playAudio": frozenset(("event", "media", "streamId")),
    "checkpoint": frozenset(("event", "streamId", "name")),
    "clearAudio": frozenset(("event", "streamId")),
    "sendDTMF": frozenset(("event", "dtmf", "streamId")),
}
_MEDIA_KEYS = frozenset(("contentType", "sampleRate", "payload"))


def _auth_id() -> str:
    return "MA" + "".join(secrets.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") for _ in range(18))


def _truthy(value: str | None) -> bool | None:
    if value is None:
        return None
    low = value.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    raise ValueError(value)


class PlivoSimulatedCaller(FormAnswerEdge, OneSocketEdge, FrameMediaEdge, JsonEnvelopeEdge):
    """One simulated inbound call through Plivo to an app answering with `<Stream>`.

    Takes `SimulatedEdge`'s arguments (script, frame drops, jitter, timeouts…). `auth_token`
    signs the webhooks (V3); `main_account_token` adds X-Plivo-Signature-Ma-V3;
    `replay_webhook` sends the very same signed request twice (same nonce);
    `stop_event=False` ends a hang-up by closing the socket only.
    """

    FETCH_FAILED = "answer_url fetch failed: {why}"
    BAD_CONTENT_TYPE = "answer_url returned content type {ctype!r}, not XML"
    XML_INVALID = "invalid Plivo XML: {why}"
    FORM_HEADERS: ClassVar[Mapping[str, str]] = {
        "Content-Type": "application/x-www-form-urlencoded",
        "User-Agent": "PlivoHTTP/1.0",
        "Accept": "*/*",
    }
    STREAM_URL_INVALID = "<Stream> body is not an absolute ws(s):// URL: {url!r}"
    STREAM_URL_NOT_WSS = "<Stream> URL must use wss://: {url!r}"
    SID_KEYS = ("streamId",)
    SID_REQUIRED = frozenset(("checkpoint", "clearAudio"))
    SID_MISMATCH = "{event} {key} {sid!r} is not this stream's"
    SID_MISSING = "{event} needs the {key}"
    BINARY_REFUSED = "binary frame: Plivo takes JSON text frames only"

    def __init__(
        self,
        base_url: str,
        *,
        auth_token: str,
        call_uuid: str | None = None,
        auth_id: str | None = None,
        webhook_path: str = "/plivo/answer",
        main_account_token: str | None = None,
        stop_event: bool = True,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("from_", "15550001111")  # Plivo numbers have no leading "+"
        kwargs.setdefault("to", "15550002222")
        super().__init__(
            base_url,
            call_sid=call_uuid or str(uuid.uuid4()),
            account_sid=auth_id or _auth_id(),
            webhook_path=webhook_path,
            **kwargs,
        )
        self._plivo_signer = PlivoSignature(auth_token)
        self._ma_signer = PlivoSignature(main_account_token) if main_account_token else None
        self.stop_event = stop_event
        self.digits_received: list[TimedName] = []
        self.stream_attributes: dict[str, str] = {}
        self._after_stream_elements: list[ET.Element] = []
        self._bidirectional = False
        self._wire_format: tuple[str, int] = CONTENT_TYPES[DEFAULT_CONTENT_TYPE]
        self._extra_wire = ""
        self._epoch0_ms = 0
        self._media_pre = ""
        self._media_mid = ""
        self._media_post = ""
        self._up: Any = None  # soxr.ResampleStream for l16 16 kHz caller audio
        self._up_buf = np.zeros(0, dtype=np.int16)

    # ------------------------------------------------------------------ webhook + XML

    def _call_params(self, status: str) -> dict[str, str]:
        params = {
            "ALegRequestUUID": self.call_sid,
            "ALegUUID": self.call_sid,
            "BillRate": "0.0085",
            "CallStatus": status,
            "CallUUID": self.call_sid,
            "CallerName": "",
            "Direction": "inbound",
            "Event": "StartApp",
            "From": self.from_,
            "ParentAuthID": self.account_sid,
            "RequestUUID": self.call_sid,
            "SessionStart": time.strftime("%Y-%m-%d %H:%M:%S.000000", time.gmtime()),
            "To": self.to,
        }
        params.update(self.extra_params)
        return params

    def _signature(self, url: str, params: Mapping[str, str], body: bytes) -> dict[str, str]:
        nonce = new_nonce()
        headers = {
            "X-Plivo-Signature-V3-Nonce": nonce,
            "X-Plivo-Signature-V3": self._plivo_signer.sign("POST", url, params, nonce),
        }
        if self._ma_signer is not None:
            headers["X-Plivo-Signature-Ma-V3"] = self._ma_signer.sign("POST", url, params, nonce)
        return headers

    def _read_document(self, body: bytes) -> bool:
        return self._read_xml(body, "Stream", self._read_stream, self._run_verb)

    def _run_verb(self, verb: ET.Element) -> bool:
        """Run a non-stream element; True if it ends the call."""
        r = self.result
        now = asyncio.get_running_loop().time()
        if verb.tag == "Speak":
            r.said.append((verb.text or "").strip())
            r.timeline.append(TimelineEvent(now, "xml_speak", r.said[-1]))
            return False
        if verb.tag in ("Wait", "Play", "PreAnswer"):
            r.timeline.append(TimelineEvent(now, f"xml_{verb.tag.lower()}"))
            return False
        if verb.tag == "Hangup":
            reason = verb.get("reason")
            if reason in ("busy", "rejected"):
                r.rejected = True
                r.reject_reason = reason
            r.timeline.append(TimelineEvent(now, "xml_hangup", reason or ""))
            r.ended_by = "server"
            return True
        r.script_errors.append(f"Plivo XML element <{verb.tag}> is not simulated; the call ends")
        r.ended_by = "server"
        return True

    def _read_stream(self, stream: ET.Element, after: list[ET.Element]) -> bool:
        r = self.result
        attrs = dict(stream.attrib)
        self.stream_attributes = attrs
        url = (stream.text or "").strip()
        if not self._stream_url_ok(url):
            return False
        try:
            bidirectional = bool(_truthy(attrs.get("bidirectional")))
            keep_alive = bool(_truthy(attrs.get("keepCallAlive")))
        except ValueError as exc:
            return self._fail(f"<Stream> boolean attribute must be true or false, got {exc}")
        track = attrs.get("audioTrack", "inbound")
        if track not in ("inbound", "outbound", "both"):
            return self._fail(f"<Stream> audioTrack {track!r} is not inbound, outbound or both")
        if bidirectional and track != "inbound":
            return self._fail(f"<Stream> is bidirectional: audioTrack must be inbound, not {track}")
        ctype = attrs.get("contentType", DEFAULT_CONTENT_TYPE).replace(" ", "")
        if ctype not in CONTENT_TYPES:
            return self._fail(f"<Stream> contentType {ctype!r} is not one Plivo streams")
        timeout = attrs.get("streamTimeout")
        if timeout is not None and not (timeout.isdigit() and int(timeout) > 0):
            return self._fail(f"<Stream> streamTimeout must be a positive integer: {timeout!r}")
        method = attrs.get("statusCallbackMethod", "POST")
        if method not in ("GET", "POST"):
            return self._fail(f"<Stream> statusCallbackMethod must be GET or POST: {method!r}")
        params = self._read_extra_headers(attrs.get("extraHeaders", ""))
        if params is None:
            return False
        if not keep_alive:
            # The stream runs beside the XML, which goes on at once; with nothing after it
            # Plivo hangs up before a conversation can happen.
            return self._fail('<Stream> without keepCallAlive="true": the XML runs on at once')
        self._bidirectional = bidirectional
        self._wire_format = CONTENT_TYPES[ctype]
        r.stream_url = url
        r.parameters = params
        self._extra_wire = ";".join(f"{k}={v}" for k, v in params.items())
        self._status_callback = attrs.get("statusCallbackUrl")
        self._after_stream_elements = after
        return True

    async def _after_stream(self) -> None:
        """The app closed the socket: Plivo goes on with the elements after `<Stream>`."""
        for element in self._after_stream_elements:
            if self._run_verb(element):
                return

    def _read_extra_headers(self, raw: str) -> dict[str, str] | None:
        if len(raw.encode()) > 512:
            self._fail(f"<Stream> extraHeaders is {len(raw.encode())} bytes; the limit is 512")
            return None
        params: dict[str, str] = {}
        for part in filter(None, raw.split(",")):
            key, sep, value = part.partition("=")
            if not sep or not _ALNUM.fullmatch(key) or not _ALNUM.fullmatch(value):
                self._fail(f"<Stream> extraHeaders entry {part[:40]!r}: letters and digits only")
                return None
            params[key] = value
        return params

    def _stream_status(self, event: str, error: str | None = None) -> None:
        """`statusCallbackUrl`: StartStream / StopStream / DroppedStream, signed like webhooks."""
        if not self._status_callback:
            return
        params = {
            "CallUUID": self.call_sid,
            "Event": {"stream-started": "StartStream", "stream-error": "DroppedStream"}.get(
                event, "StopStream"
            ),
            "StreamID": self._stream_sid,
            "Timestamp": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        }
        if error:
            params["Error"] = error[:200]
        self._post_soon(self._status_callback, params)

    # ------------------------------------------------------------------ stream

    def _new_stream_sid(self) -> str:
        return str(uuid.uuid4())

    def _stream_opened(self) -> None:
        if self._wire_format == ("l16", 16000):
            self._up = soxr.ResampleStream(8000, 16000, 1, dtype="int16")
            self._up_buf = np.zeros(2 * self._fb, dtype=np.int16)

    def _envelope(self, event: str, body: dict[str, Any] | None = None) -> str:
        """A frame from Plivo; `dtmf`/`stop`/`mark` bodies from the edge are translated."""
        msg: dict[str, Any] = {"event": event, "sequenceNumber": self._next_seq()}
        if event == "start":
            msg["start"] = body
            msg["extra_headers"] = self._extra_wire
            return orjson.dumps(msg).decode()
        msg["streamId"] = self._stream_sid
        if event == "dtmf":
            assert body is not None
            stamp = str(int(time.time() * 1000))
            msg["dtmf"] = {"track": "inbound", "digit": body["digit"], "timestamp": stamp}
            msg["extra_headers"] = self._extra_wire
        elif event in ("mark", "playedStream"):
            assert body is not None
            msg["event"] = "playedStream"
            msg["name"] = body["name"]
        return orjson.dumps(msg).decode()

    def _mark_echo(self, name: str) -> str:
        return self._envelope("playedStream", {"name": name})

    def _stop_frame(self) -> str | None:
        return self._envelope("stop") if self.stop_event else None

    async def _hello(self, ws: ClientConnection) -> None:
        encoding, rate = self._wire_format
        start = {
            "callId": self.call_sid,
            "streamId": self._stream_sid,
            "accountId": self.account_sid,
            "tracks": ["inbound"],
            "mediaFormat": {"encoding": f"audio/x-{encoding}", "sampleRate": rate},
        }
        await ws.send(self._envelope("start", start))
        self._epoch0_ms = int(time.time() * 1000)
        sid = orjson.dumps(self._stream_sid).decode()
        extra = orjson.dumps(self._extra_wire).decode()
        self._media_pre = '{"event":"media","sequenceNumber":'
        self._media_mid = f',"streamId":{sid},"media":{{"track":"inbound","timestamp":"'
        self._media_post = f'"}},"extra_headers":{extra}}}'

    def _media_message(self, n: int, frame: bytes) -> str:
        """Plivo's `media`: numeric chunk and sequenceNumber, epoch-ms timestamp as a string."""
        stamp = self._epoch0_ms + (n - 1) * self.frame_ms
        payload = self._wire_payload(frame)
        return (
            f'{self._media_pre}{self._next_seq()}{self._media_mid}{stamp}","chunk":{n},'
            f'"payload":"{payload}{self._media_post}'
        )

    def _wire_payload(self, frame: bytes) -> str:
        """A μ-law 8 kHz caller frame in the stream's contentType, base64."""
        encoding, rate = self._wire_format
        if encoding == "mulaw":
            data = frame
        else:
            pcm = ulaw_decode(frame)
            if rate == 16000:
                pcm = self._upsample(pcm)
            data = np.ascontiguousarray(pcm, dtype="<i2").tobytes()
        return binascii.b2a_base64(data, newline=False).decode()

    def _upsample(self, pcm: np.ndarray) -> np.ndarray:
        """8 -> 16 kHz, exactly twice the samples per frame: soxr's output comes in uneven
        pieces, so a 20 ms cushion of silence (once, at the start) keeps every frame whole."""
        buf = np.concatenate((self._up_buf, self._up.resample_chunk(pcm)))
        want = 2 * pcm.size
        if buf.size < want:
            buf = np.concatenate((buf, np.zeros(want - buf.size, dtype=np.int16)))
        self._up_buf = buf[want:]
        return buf[:want]

    # ------------------------------------------------------------------ what the app sends

    async def _on_frame(self, data: str | bytes, now: float) -> None:
        read = await self._read_json(data, _ALLOWED_KEYS)
        if read is None:
            return
        event, msg = read
        if event == "playAudio":
            self._on_play_audio(msg, now)
        elif event == "checkpoint":
            name = msg.get("name")
            if type(name) is not str or not name:
                self._error("checkpoint needs a non-empty name")
                return
            self._queue_mark(name, now)
        elif event == "clearAudio":
            # Plivo drops the queue's checkpoints: they never come back (they did not play)
            await self._clear_queue(now, echo_marks=False)
            assert self._ws is not None
            await self._ws.send(self._envelope("clearedAudio"))
        else:
            digits = msg.get("dtmf")
            if type(digits) is not str or not _SEND_DTMF.fullmatch(digits):
                self._error(f"sendDTMF needs digits 0-9*#, got {str(digits)[:40]!r}")
                return
            self.digits_received.append(TimedName(digits, now))
            self.result.timeline.append(TimelineEvent(now, "send_dtmf", digits))

    def _on_play_audio(self, msg: dict[str, Any], now: float) -> None:
        if not self._bidirectional:
            self._error("playAudio on a one-way stream (bidirectional is not true)")
            return
        media = msg.get("media")
        if type(media) is not dict:
            self._error("playAudio needs a media object")
            return
        if self.strict_fields and not _MEDIA_KEYS.issuperset(media):
            self._error(f"unexpected fields {sorted(set(media) - _MEDIA_KEYS)} in playAudio.media")
            return
        ctype, rate, payload = (
            media.get("contentType"),
            media.get("sampleRate"),
            media.get("payload"),
        )
        rates = _PLAY_RATES.get(ctype) if type(ctype) is str else None
        if rates is None:
            self._error(
                f"playAudio contentType {str(ctype)[:40]!r} is not audio/x-mulaw or audio/x-l16"
            )
            return
        if type(rate) is not int or rate not in rates:
            self._error(f"playAudio sampleRate {str(rate)[:20]} is not one of {rates} for {ctype}")
            return
        if type(payload) is not str or not payload:
            self._error("playAudio needs a non-empty string payload")
            return
        try:
            audio = binascii.a2b_base64(payload, strict_mode=True)
        except (binascii.Error, ValueError):
            self._error("playAudio payload is not valid base64")
            return
        if ctype == "audio/x-l16":
            if len(audio) % 2:
                self._error("playAudio L16 payload holds half a sample")
                return
            pcm = np.frombuffer(audio, dtype="<i2")
            if rate != 8000:
                pcm = soxr.resample(pcm, rate, 8000)
            audio = ulaw_encode(np.ascontiguousarray(pcm, dtype=np.int16)).tobytes()
        if not audio:
            self._error("playAudio payload is empty")
            return
        self._queue_audio(audio, now)
