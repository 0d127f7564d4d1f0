"""Vonage Voice API WebSocket, sans I/O: check what Vonage sends, build what we send back.

The wire (https://developer.vonage.com/en/voice/voice-api/concepts/websockets):

- Vonage opens the socket (it is the client) to the `uri` of the NCCO's `connect` websocket
  endpoint. Its first message is TEXT: `{"event":"websocket:connected",
  "content-type":"audio/l16;rate=16000", ...}` with every NCCO endpoint `headers` entry copied
  to the top level (that is how per-call values come back to us).
- Then BINARY messages are the caller's audio: 16-bit signed little-endian linear PCM, mono,
  one 20 ms frame per message (320 bytes at 8 kHz, 640 at 16 kHz, 960 at 24 kHz).
- TEXT messages are JSON events: `websocket:dtmf` (`digit`, `duration`), `websocket:notify`
  (the `payload` of a `notify` we sent, once the audio queued before it has played) and
  `websocket:cleared` (our `clear` emptied the queue). Vonage may add events: unknown ones are
  tolerated.
- We send BINARY 20 ms frames of the same format (exactly that size: Vonage buffers them and
  plays them at real time), and TEXT commands `{"action":"clear"}` and
  `{"action":"notify","payload":{...}}`.
- There is no `stop` message: the call (or the NCCO) ends by closing the socket.

`VonageStream` is the per-call state machine (h11 style): `receive` returns one typed event
from `carriers.base` or raises `CarrierProtocolError` naming the broken rule, leaving the
stream unchanged. The builders return the frames to send.
"""

from __future__ import annotations

import enum
import re
import secrets
from collections.abc import Mapping
from typing import Any

import orjson

from livecall.carriers.base import (
    CallerAudio,
    CallStarted,
    CallStopped,
    Capabilities,
    CarrierEvent,
    CarrierProtocolError,
    Dtmf,
    Frame,
    Ignored,
    MediaFormat,
    PlayedUpTo,
)
from livecall.carriers.stream_base import short

__all__ = [
    "CALL_HEADER_KEYS",
    "CAPABILITIES",
    "CLEAR_COMMAND",
    "DEFAULT_MAX_FRAME_BYTES",
    "MAX_BUFFERED_FRAMES",
    "SUPPORTED_RATES",
    "StreamState",
    "VonageStream",
    "content_type_for",
    "notify_command",
    "parse_content_type",
]

SUPPORTED_RATES = (8000, 16000, 24000)  # audio/l16;rate=… the connect endpoint accepts
DEFAULT_MAX_FRAME_BYTES = 64 * 1024  # text frames; audio frames must be exactly 20 ms
# Vonage queues at most this many 20 ms messages for playout (about a minute); the
# documentation has said 1024 in the past, so livecall must never get far ahead of real time.
MAX_BUFFERED_FRAMES = 3072
MAX_MARK_NAME = 256
_SETTLED_KEPT = 1024
_BINARY = (bytes, bytearray, memoryview)
_DTMF_DIGITS = frozenset("0123456789*#ABCDabcd")

# Header names livecall puts in the NCCO for the call itself; they are not custom parameters.
CALL_HEADER_KEYS = ("call_uuid", "conversation_uuid", "from", "to")
_RESERVED = frozenset(("event", "content-type", *CALL_HEADER_KEYS))

CAPABILITIES = Capabilities(
    marks=True,  # `notify` comes back as `websocket:notify` once what precedes it has played
    clear=True,  # `{"action":"clear"}`
    dtmf_in=True,  # `websocket:dtmf`
    send_dtmf_on_stream=False,  # only over REST: PUT /v1/calls/{uuid}/dtmf
    hangup_on_stream=True,  # closing the socket ends the connect action, hence the NCCO
    frame_ms=20,
)

CLEAR_COMMAND = '{"action":"clear"}'

_CONTENT_TYPE_RE = re.compile(r"^\s*audio/l16\s*;\s*rate\s*=\s*(\d+)\s*$", re.IGNORECASE)


def parse_content_type(value: object) -> MediaFormat:
    """`audio/l16;rate=16000` -> MediaFormat; CarrierProtocolError for anything else."""
    if type(value) is not str:
        raise CarrierProtocolError(
            f"websocket:connected needs a string content-type, got {short(value)}"
        )
    match = _CONTENT_TYPE_RE.match(value)
    if match is None:
        raise CarrierProtocolError(
            f"content-type must be audio/l16;rate=<8000|16000|24000>, got {short(value)}"
        )
    rate = int(match.group(1))
    if rate not in SUPPORTED_RATES:
        raise CarrierProtocolError(f"content-type rate {rate} is not one of {SUPPORTED_RATES}")
    return MediaFormat("l16", rate)


def content_type_for(sample_rate: int) -> str:
    """The NCCO `content-type` for a sample rate (8000, 16000 or 24000)."""
    if sample_rate not in SUPPORTED_RATES:
        raise ValueError(f"Vonage streams L16 at {SUPPORTED_RATES} Hz, not {sample_rate}")
    return f"audio/l16;rate={sample_rate}"


def notify_command(name: str) -> str:
    """`notify` with livecall's mark name in its payload; Vonage echoes the payload back."""
    return orjson.dumps({"action": "notify", "payload": {"name": name}}).decode()


def _param_value(value: Any) -> str:
    """Header values come back as JSON values; livecall's parameters are strings."""
    if type(value) is str:
        return value
    return orjson.dumps(value).decode()


class StreamState(enum.Enum):
    """Where a stream is in its life: websocket:connected -> audio/events... -> closed."""

    AWAITING_CONNECTED = "awaiting-connected"
    STREAMING = "streaming"
    CLOSED = "closed"


class VonageStream:
    """One call's Vonage WebSocket, sans I/O (implements `carriers.base.CarrierStream`).

    Inbound rules: the first message is the text `websocket:connected` with a supported
    `content-type`, exactly once; audio only after it, as binary messages of exactly one 20 ms
    frame; text messages are JSON objects with a string `event`; a `websocket:notify` payload
    must name a mark this stream sent; nothing after `closed()`. Unknown events are `Ignored`.

    Outbound: `play` cuts audio into exact 20 ms frames and keeps the tail until more audio
    comes; `mark` pads that tail with silence so the mark sits right after it, then sends
    `notify`; `clear` drops the tail and sends `clear`.
    """

    __slots__ = (
        "_call_id_fallback",
        "_pending_marks",
        "_settled_marks",
        "_tail",
        "capabilities",
        "frames_received",
        "frames_sent",
        "max_frame_bytes",
        "media_format",
        "protocol_errors",
        "started",
        "state",
    )

    def __init__(
        self,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        media_format: MediaFormat | None = None,
    ) -> None:
        self.capabilities = CAPABILITIES
        self.max_frame_bytes = max_frame_bytes
        # Until websocket:connected says otherwise, the rate livecall asked for in its NCCO.
        self.media_format = media_format or MediaFormat("l16", 16000)
        self.started: CallStarted | None = None
        self.state = StreamState.AWAITING_CONNECTED
        self.frames_received = 0
        self.frames_sent = 0
        self.protocol_errors = 0
        self._tail = b""
        self._pending_marks: list[str] = []  # sent, not yet played or cleared (oldest first)
        self._settled_marks: dict[str, None] = {}  # recent settled names, oldest first
        self._call_id_fallback = "vonage-ws-" + secrets.token_hex(8)

    def __repr__(self) -> str:
        call = self.started.call_id if self.started else None
        return f"<VonageStream {self.state.value} call={call} frames={self.frames_received}>"

    # ------------------------------------------------------------------ inbound

    def receive(self, frame: Frame) -> CarrierEvent:
        """Check and interpret one message; CarrierProtocolError (state unchanged) if bad."""
        try:
            if type(frame) is bytes:  # the hot path: one binary frame every 20 ms
                return self._audio(frame)
            if isinstance(frame, _BINARY):
                return self._audio(bytes(frame))
            return self._text(frame)
        except CarrierProtocolError:
            self.protocol_errors += 1
            raise

    def closed(self, code: int | None = None) -> CallStopped:
        """The socket closed: for Vonage that is the end of the stream (there is no `stop`)."""
        self.state = StreamState.CLOSED
        self._pending_marks.clear()
        return CallStopped(reason="closed" if code is None else f"closed ({code})")

    def _audio(self, data: bytes) -> CallerAudio:
        state = self.state
        if state is StreamState.CLOSED:
            raise CarrierProtocolError("binary audio after the stream closed")
        if state is StreamState.AWAITING_CONNECTED:
            raise CarrierProtocolError("binary audio before websocket:connected")
        expected = self.media_format.bytes_per_20ms
        if len(data) != expected:
            raise CarrierProtocolError(
                f"an audio message must be one 20 ms frame ({expected} bytes at "
                f"{self.media_format.sample_rate} Hz), got {len(data)} bytes"
            )
        n = self.frames_received
        self.frames_received = n + 1
        return CallerAudio(data, sequence=n + 1, timestamp_ms=n * 20)

    def _text(self, text: str) -> CarrierEvent:
        limit = self.max_frame_bytes
        size = len(text)
        if size * 4 > limit and size <= limit:
            size = len(text.encode("utf-8", "surrogatepass"))
        if size > limit:
            raise CarrierProtocolError(
                f"text message of {size} bytes exceeds the {limit}-byte limit"
            )
        if self.state is StreamState.CLOSED:
            raise CarrierProtocolError("text message after the stream closed")
        try:
            msg = orjson.loads(text)
        except orjson.JSONDecodeError:
            raise CarrierProtocolError("a text message must be valid JSON") from None
        if type(msg) is not dict:
            raise CarrierProtocolError(
                f"a text message must be a JSON object, got {type(msg).__name__}"
            )
        event = msg.get("event")
        if type(event) is not str or not event:
            raise CarrierProtocolError(
                f"a text message needs a string 'event' field, got {short(event)}"
            )
        if event == "websocket:connected":
            return self._connected(msg)
        if self.state is StreamState.AWAITING_CONNECTED:
            raise CarrierProtocolError(f"{short(event)} before websocket:connected")
        if event == "websocket:dtmf":
            return self._dtmf(msg)
        if event == "websocket:notify":
            return self._notify(msg)
        if event == "websocket:cleared":
            return self._cleared()
        return Ignored(event[:64])

    def _connected(self, msg: dict[str, Any]) -> CallStarted:
        if self.state is not StreamState.AWAITING_CONNECTED:
            raise CarrierProtocolError("websocket:connected received twice (it is sent once)")
        fmt = parse_content_type(msg.get("content-type"))
        params = {str(k): _param_value(v) for k, v in msg.items() if k not in _RESERVED}
        call_id = msg.get("call_uuid")
        started = CallStarted(
            call_id=call_id if type(call_id) is str and call_id else self._call_id_fallback,
            stream_id=None,  # Vonage names no stream: the socket is the stream
            media_format=fmt,
            custom_parameters=params,
            account_id=None,
            from_number=_opt_str(msg, "from"),
            to_number=_opt_str(msg, "to"),
            direction=None,
        )
        self.media_format = fmt
        self.started = started
        self.state = StreamState.STREAMING
        return started

    def _dtmf(self, msg: dict[str, Any]) -> Dtmf:
        digit = msg.get("digit")
        if type(digit) is not str or len(digit) != 1 or digit not in _DTMF_DIGITS:
            raise CarrierProtocolError(
                f"websocket:dtmf needs one digit (0-9, *, #, A-D), got {short(digit)}"
            )
        duration = msg.get("duration")
        if duration is not None and (type(duration) not in (int, float) or duration < 0):
            raise CarrierProtocolError(
                f"websocket:dtmf duration must be a non-negative number, got {short(duration)}"
            )
        return Dtmf(digit.upper())

    def _notify(self, msg: dict[str, Any]) -> CarrierEvent:
        payload = msg.get("payload")
        if type(payload) is not dict:
            raise CarrierProtocolError(
                f"websocket:notify needs a 'payload' object, got {short(payload)}"
            )
        name = payload.get("name")
        if type(name) is not str:
            raise CarrierProtocolError(
                f"websocket:notify payload.name must be a string, got {short(name)}"
            )
        pending = self._pending_marks
        if name in pending:
            # Vonage plays in order: everything up to this notify is settled.
            i = pending.index(name)
            self._settle(pending[: i + 1])
            del pending[: i + 1]
            return PlayedUpTo(name)
        if name in self._settled_marks:
            return Ignored("websocket:notify for a mark already settled by websocket:cleared")
        raise CarrierProtocolError(f"websocket:notify for mark {short(name)} that was never sent")

    def _cleared(self) -> CarrierEvent:
        pending = self._pending_marks
        if not pending:
            return Ignored("websocket:cleared")
        # The queue is empty: every pending mark is as good as played (Twilio's clear semantics).
        last = pending[-1]
        self._settle(pending)
        pending.clear()
        return PlayedUpTo(last)

    def _settle(self, names: list[str]) -> None:
        settled = self._settled_marks
        for name in names:
            settled[name] = None
        while len(settled) > _SETTLED_KEPT:  # a long call must not grow this without bound
            del settled[next(iter(settled))]

    # ------------------------------------------------------------------ outbound

    def play(self, audio: bytes) -> list[Frame]:
        """Binary 20 ms frames of `audio` (L16 at the stream's rate); the tail waits for more."""
        fb = self.media_format.bytes_per_20ms
        data = self._tail + bytes(audio) if self._tail else bytes(audio)
        whole = len(data) - len(data) % fb
        self._tail = data[whole:]
        frames: list[Frame] = [data[i : i + fb] for i in range(0, whole, fb)]
        self.frames_sent += len(frames)
        return frames

    def flush(self) -> list[Frame]:
        """The held tail as one frame padded with silence (nothing if there is no tail)."""
        tail = self._tail
        if not tail:
            return []
        self._tail = b""
        self.frames_sent += 1
        return [tail + bytes(self.media_format.bytes_per_20ms - len(tail))]

    def mark(self, name: str) -> list[Frame]:
        """Flush the tail, then `notify`: its echo says everything before it has played."""
        if not isinstance(name, str) or not name or len(name) > MAX_MARK_NAME:
            raise ValueError(f"a mark name must be a non-empty string of <= {MAX_MARK_NAME}")
        if name in self._pending_marks or name in self._settled_marks:
            raise ValueError(f"mark {name!r} was already used on this stream")
        frames = self.flush()
        self._pending_marks.append(name)
        frames.append(notify_command(name))
        return frames

    def clear(self) -> list[Frame]:
        """Drop the held tail and tell Vonage to drop its queue (barge-in)."""
        self._tail = b""
        return [CLEAR_COMMAND]

    def send_dtmf(self, digits: str) -> list[Frame]:
        """Vonage cannot play DTMF from the stream (REST only): no frames."""
        return []

    def hangup(self) -> list[Frame]:
        """No message ends the call: close the socket (the NCCO then ends) or use REST."""
        self._tail = b""
        return []

    @property
    def pending_marks(self) -> tuple[str, ...]:
        return tuple(self._pending_marks)


def _opt_str(msg: Mapping[str, Any], key: str) -> str | None:
    value = msg.get(key)
    return value if type(value) is str and value else None
