"""Exotel AgentStream (Voicebot applet), sans I/O: check what Exotel sends, build what we send.

Exotel opens the WebSocket the Voicebot applet names and sends JSON text frames, snake case,
the stream id both at the top level and inside `start`:

    connected -> start -> media (every ~100 ms)... (dtmf, mark interleaved) -> stop

Audio is 16-bit linear PCM, little-endian, mono ("raw/slin"), 8 kHz unless the stream URL
asked for `?sample-rate=16000|24000`, base64 in `media.payload`. Counters arrive as strings
("3") in one page of the docs and as numbers in another: both are taken.

Back (Voicebot only) the app sends `media`, `mark` (echoed once what came before it has
played) and `clear` (drop what is queued). Exotel's rules for played-back audio: a chunk is a
multiple of 320 bytes (a shorter last packet leaves a 20 ms gap), at least "3.2k [100ms
data]" (smaller ones risk jitter; 3200 bytes are 200 ms at 8 kHz, so both readings are
kept: 3200 bytes at 8 and 16 kHz, 4800 at 24 kHz) and at most 100 kB. `ExotelStream.play`
therefore buffers and sends chunks of that minimum; `mark` first sends what is buffered
in whole 320-byte units (the sub-320-byte rest rides with the next audio, so a mark may
be confirmed up to 20 ms early rather than padding silence into the middle of a word);
`flush` pads the rest to 320 bytes (end of a turn). There is no message to send DTMF or
to hang up: closing the WebSocket ends the Voicebot applet and the flow goes on to its
next applet (Hangup, Connect...).

`ExotelStream` is the per-call state machine (h11 style): `connected` optional and first,
`start` once, media/dtmf/mark only after start, nothing after stop, every `stream_sid` the
start's, frames bounded, media chunks only forward. A rejected frame raises
`CarrierProtocolError` naming the rule and changes nothing but counters.
"""

from __future__ import annotations

import binascii
import enum
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

__all__ = [
    "CAPABILITIES",
    "CHUNK_UNIT_BYTES",
    "DEFAULT_MAX_FRAME_BYTES",
    "DTMF_DIGITS",
    "MAX_CHUNK_BYTES",
    "MIN_CHUNK_BYTES",
    "MIN_CHUNK_MS",
    "SAMPLE_RATES",
    "ExotelStream",
    "StreamState",
    "clear_frame",
    "mark_frame",
    "media_frame",
]

# Voicebot streams carry marks, clear and DTMF in; no DTMF out, hang-up is closing the socket.
CAPABILITIES = Capabilities(
    marks=True,
    clear=True,
    dtmf_in=True,
    send_dtmf_on_stream=False,
    hangup_on_stream=True,
    frame_ms=20,  # 320-byte units; `play` packs them into its minimum chunk
)
SAMPLE_RATES = (8000, 16000, 24000)  # the rates `?sample-rate=` may ask for
CHUNK_UNIT_BYTES = 320  # every chunk played back is a multiple of this
MIN_CHUNK_BYTES = 3200  # "minimum chunk size: 3.2k [100ms data]"
MIN_CHUNK_MS = 100
MAX_CHUNK_BYTES = 100_000 // CHUNK_UNIT_BYTES * CHUNK_UNIT_BYTES  # "maximum 100k"
DEFAULT_MAX_FRAME_BYTES = 256 * 1024  # a 100 ms frame at 24 kHz is ~6.4 kB of base64
DTMF_DIGITS = frozenset("0123456789*#ABCD")
MAX_COUNTER = 2**31 - 1
MAX_CHUNK_JUMP = 600  # 60 s of 100 ms frames
_L16_NAMES = frozenset(("audio/x-raw", "raw", "slin", "audio/l16", "l16", "linear16", "pcm"))


# ----------------------------------------------------------------------------- outbound


def media_frame(stream_sid: str, pcm: bytes) -> str:
    """`media` to Exotel: base64 little-endian 16-bit PCM at the stream's rate."""
    payload = binascii.b2a_base64(pcm, newline=False).decode("ascii")
    sid = orjson.dumps(stream_sid).decode()
    return f'{{"event":"media","stream_sid":{sid},"media":{{"payload":"{payload}"}}}}'


def mark_frame(stream_sid: str, name: str) -> str:
    """`mark` to Exotel: echoed back once everything sent before it has been played."""
    return orjson.dumps(
        {"event": "mark", "stream_sid": stream_sid, "mark": {"name": name}}
    ).decode()


def clear_frame(stream_sid: str) -> str:
    """`clear` to Exotel: drop the audio queued and not yet playing (barge-in)."""
    return orjson.dumps({"event": "clear", "stream_sid": stream_sid}).decode()


# ----------------------------------------------------------------------------- parsing


def _short(value: object) -> str:
    """A value for an error message, cut short so a hostile frame can't flood the logs."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _counter(value: object, field: str) -> int | None:
    """Exotel's counters are digit strings in one page of its docs and numbers in another."""
    if value is None:
        return None
    if type(value) is str and value.isascii() and value.isdigit():
        number = int(value)
    elif type(value) is int:
        number = value
    else:
        raise CarrierProtocolError(f"{field} must be a whole number, got {_short(value)}")
    if number < 0 or number > MAX_COUNTER:
        raise CarrierProtocolError(f"{field} {number} is out of range")
    return number


def _text(container: Mapping[str, Any], key: str, field: str) -> str | None:
    value = container.get(key)
    if value is None or type(value) is str:
        return value
    raise CarrierProtocolError(f"{field} must be a string, got {_short(value)}")


def _obj(msg: Mapping[str, Any], key: str, event: str) -> dict[str, Any]:
    value = msg.get(key)
    if type(value) is dict:
        return value
    raise CarrierProtocolError(f"{event} message needs a {key!r} object, got {_short(value)}")


def _media_format(fmt: Mapping[str, Any]) -> MediaFormat:
    encoding = _text(fmt, "encoding", "start.media_format.encoding")
    if encoding is not None and encoding.lower() not in _L16_NAMES:
        raise CarrierProtocolError(
            f"start.media_format.encoding {_short(encoding)} is not Exotel's raw 16-bit PCM"
        )
    rate = _counter(fmt.get("sample_rate"), "start.media_format.sample_rate")
    if rate is None:
        rate = 8000
    if rate not in SAMPLE_RATES:
        raise CarrierProtocolError(
            f"start.media_format.sample_rate {rate} is not one of Exotel's {SAMPLE_RATES}"
        )
    _counter(fmt.get("bit_rate"), "start.media_format.bit_rate")  # "16" or "128": unused
    return MediaFormat("l16", rate)


class StreamState(enum.Enum):
    """Where a stream is in its life: connected? -> start -> media... -> stop."""

    AWAITING_CONNECTED = "awaiting-connected"
    AWAITING_START = "awaiting-start"
    STREAMING = "streaming"
    STOPPED = "stopped"


class ExotelStream:
    """One Voicebot stream: frames in, typed events out; commands in, frames out.

    `max_frame_bytes` bounds an inbound frame. The media format is known from `start`; before
    it, `play` assumes 8 kHz (Exotel's default) only to size chunks, and refuses to build
    frames (there is no stream_sid to address them to).
    """

    capabilities = CAPABILITIES

    def __init__(self, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if max_frame_bytes <= 0:
            raise ValueError("max_frame_bytes must be positive")
        self.max_frame_bytes = max_frame_bytes
        self.state = StreamState.AWAITING_CONNECTED
        self.started: CallStarted | None = None
        self.stream_sid: str | None = None
        self.media_format = MediaFormat("l16", 8000)
        self.last_chunk: int | None = None
        self.frames_received = 0
        self.frames_missing = 0
        self.frames_late = 0
        self.protocol_errors = 0
        self.stop_reason: str | None = None
        self._pending = bytearray()  # outbound PCM not yet a whole chunk
        self._chunk_bytes = self._min_chunk(8000)

    def __repr__(self) -> str:
        return (
            f"<ExotelStream {self.state.value} sid={self.stream_sid} "
            f"frames={self.frames_received} missing={self.frames_missing}>"
        )

    @staticmethod
    def _min_chunk(rate: int) -> int:
        """Exotel's minimum, read both ways: 3.2 kB and 100 ms (3200 B is 200 ms at 8 kHz)."""
        return max(MIN_CHUNK_BYTES, rate * 2 * MIN_CHUNK_MS // 1000)

    # ------------------------------------------------------------------ inbound

    def receive(self, frame: Frame) -> CarrierEvent:
        """Check and parse one frame; `CarrierProtocolError` (state unchanged) on a broken rule."""
        try:
            return self._receive(frame)
        except CarrierProtocolError:
            self.protocol_errors += 1
            raise

    def _receive(self, frame: Frame) -> CarrierEvent:
        limit = self.max_frame_bytes
        size = len(frame)
        if isinstance(frame, str) and size * 4 > limit and size <= limit:
            size = len(frame.encode("utf-8", "surrogatepass"))  # only when it could matter
        if size > limit:
            raise CarrierProtocolError(f"frame of {size} bytes exceeds the {limit}-byte limit")
        if not isinstance(frame, str):
            raise CarrierProtocolError("binary frames are not part of Exotel's stream protocol")
        try:
            msg = orjson.loads(frame)
        except orjson.JSONDecodeError:
            raise CarrierProtocolError("invalid JSON") from None
        if type(msg) is not dict:
            raise CarrierProtocolError(f"a message must be a JSON object, got {_short(msg)}")
        event = msg.get("event")
        if type(event) is not str or not event:
            raise CarrierProtocolError(f"a message needs a string 'event', got {_short(event)}")
        state = self.state
        if state is StreamState.STOPPED:
            raise CarrierProtocolError(f"{event} message after stop")
        if event == "media":
            self._check_streaming(msg, event)
            return self._media(msg)
        if event == "connected":
            if state is not StreamState.AWAITING_CONNECTED:
                raise CarrierProtocolError("connected must be the first message of the stream")
            self.state = StreamState.AWAITING_START
            return Ignored("connected")
        if event == "start":
            if state is StreamState.STREAMING:
                raise CarrierProtocolError("start received twice (start is sent exactly once)")
            return self._start(msg)
        if event == "stop":
            if state is StreamState.STREAMING:
                self._check_id(msg, event)
            stop = msg.get("stop")
            stop = stop if type(stop) is dict else {}
            reason = _text(stop, "reason", "stop.reason")
            self.state = StreamState.STOPPED
            self.stop_reason = reason
            return CallStopped(reason)
        if event == "dtmf":
            self._check_streaming(msg, event)
            body = _obj(msg, "dtmf", event)
            digit = body.get("digit")
            if type(digit) is not str or digit.upper() not in DTMF_DIGITS:
                raise CarrierProtocolError(
                    f"dtmf.digit must be one of 0-9*#A-D, got {_short(digit)}"
                )
            _counter(body.get("duration"), "dtmf.duration")
            return Dtmf(digit.upper())
        if event == "mark":
            self._check_streaming(msg, event)
            name = _obj(msg, "mark", event).get("name")
            if type(name) is not str or not name:
                raise CarrierProtocolError(
                    f"mark.name must be a non-empty string, got {_short(name)}"
                )
            return PlayedUpTo(name)
        return Ignored(event[:40])  # Exotel adds events over time (e.g. "silence" in beta)

    def _check_streaming(self, msg: Mapping[str, Any], event: str) -> None:
        if self.state is not StreamState.STREAMING:
            raise CarrierProtocolError(f"{event} message before start")
        self._check_id(msg, event)

    def _check_id(self, msg: Mapping[str, Any], event: str) -> None:
        sid = msg.get("stream_sid")
        if sid is not None and sid != self.stream_sid:
            raise CarrierProtocolError(
                f"{event} stream_sid {_short(sid)} does not match this stream's {self.stream_sid}"
            )

    def _start(self, msg: dict[str, Any]) -> CallStarted:
        start = _obj(msg, "start", "start")
        outer = _text(msg, "stream_sid", "stream_sid")
        sid = _text(start, "stream_sid", "start.stream_sid") or outer
        if not sid:
            raise CarrierProtocolError("start needs a non-empty stream_sid")
        if outer and outer != sid:
            raise CarrierProtocolError(
                f"start.stream_sid {_short(sid)} does not match the message's {_short(outer)}"
            )
        call_sid = _text(start, "call_sid", "start.call_sid")
        if not call_sid:
            raise CarrierProtocolError("start needs a non-empty start.call_sid")
        fmt_raw = start.get("media_format")
        if fmt_raw is not None and type(fmt_raw) is not dict:
            raise CarrierProtocolError(
                f"start.media_format must be an object, got {_short(fmt_raw)}"
            )
        fmt = _media_format(fmt_raw or {})
        params_raw = start.get("custom_parameters")
        if params_raw is None:
            params_raw = {}
        if type(params_raw) is not dict:
            raise CarrierProtocolError(
                f"start.custom_parameters must be an object, got {_short(params_raw)}"
            )
        params = {
            str(k): v if type(v) is str else orjson.dumps(v).decode() for k, v in params_raw.items()
        }
        _counter(msg.get("sequence_number"), "sequence_number")
        started = CallStarted(
            call_id=call_sid,
            stream_id=sid,
            media_format=fmt,
            custom_parameters=params,
            account_id=_text(start, "account_sid", "start.account_sid"),
            from_number=_text(start, "from", "start.from"),
            to_number=_text(start, "to", "start.to"),
            direction=_text(start, "direction", "start.direction"),
        )
        self.state = StreamState.STREAMING
        self.started = started
        self.stream_sid = sid
        self.media_format = fmt
        self._chunk_bytes = self._min_chunk(fmt.sample_rate)
        return started

    def _media(self, msg: dict[str, Any]) -> CallerAudio:
        body = _obj(msg, "media", "media")
        payload = body.get("payload")
        if type(payload) is not str:
            raise CarrierProtocolError(f"media.payload must be a string, got {_short(payload)}")
        chunk = _counter(body.get("chunk"), "media.chunk")
        stamp = _counter(body.get("timestamp"), "media.timestamp")
        seq = _counter(msg.get("sequence_number"), "sequence_number")
        try:
            audio = binascii.a2b_base64(payload, strict_mode=True)
        except (binascii.Error, ValueError):
            raise CarrierProtocolError("media.payload is not valid base64") from None
        if len(audio) & 1:
            raise CarrierProtocolError(
                f"media.payload holds {len(audio)} bytes: not whole 16-bit samples"
            )
        if chunk is not None:
            last = self.last_chunk
            if last is not None and chunk <= last:
                self.frames_late += 1
                raise CarrierProtocolError(
                    f"media chunk {chunk} is not after chunk {last} (duplicate or out of order)"
                )
            if chunk - (last or 0) > MAX_CHUNK_JUMP:
                raise CarrierProtocolError(
                    f"media chunk {chunk} jumps more than {MAX_CHUNK_JUMP} past {last or 0}"
                )
            self.frames_missing += max(0, chunk - (last or 0) - 1)  # numbered from 1
            self.last_chunk = chunk
        self.frames_received += 1
        return CallerAudio(audio, seq if chunk is None else chunk, stamp)

    # ------------------------------------------------------------------ outbound

    def _sid(self) -> str:
        if self.stream_sid is None:
            raise RuntimeError("no stream_sid yet: Exotel's start has not arrived")
        return self.stream_sid

    def closed(self, code: int | None = None) -> CallStopped:
        """The socket closed: the stream is over even if its `stop` never came."""
        self.state = StreamState.STOPPED
        return CallStopped(reason="closed" if code is None else f"closed ({code})")

    def play(self, audio: bytes) -> list[Frame]:
        """Little-endian PCM at the stream's rate -> `media` frames of the minimum chunk."""
        sid = self._sid()
        pending = self._pending
        pending += audio
        size = self._chunk_bytes
        if len(pending) < size:
            return []
        frames: list[Frame] = []
        cut = len(pending) - len(pending) % size
        view = memoryview(pending)
        for lo in range(0, cut, size):
            frames.append(media_frame(sid, bytes(view[lo : lo + size])))
        view.release()
        del pending[:cut]
        return frames

    def _send_units(self, *, pad: bool) -> list[Frame]:
        pending = self._pending
        n = len(pending)
        if pad and n % CHUNK_UNIT_BYTES:
            pending += bytes(CHUNK_UNIT_BYTES - n % CHUNK_UNIT_BYTES)  # silence to 20 ms
            n = len(pending)
        cut = n - n % CHUNK_UNIT_BYTES
        if not cut:
            return []
        frames: list[Frame] = [media_frame(self._sid(), bytes(pending[:cut]))]
        del pending[:cut]
        return frames

    def mark(self, name: str) -> list[Frame]:
        """Buffered audio in whole 320-byte units, then the mark (a <20 ms rest waits)."""
        if not isinstance(name, str) or not name:
            raise ValueError("a mark needs a non-empty name")
        frames = self._send_units(pad=False)
        frames.append(mark_frame(self._sid(), name))
        return frames

    def flush(self) -> list[Frame]:
        """End of a turn: everything buffered, padded with silence to a whole 320 bytes."""
        return self._send_units(pad=True)

    def clear(self) -> list[Frame]:
        """Barge-in: drop what is buffered here and ask Exotel to drop its queue."""
        self._pending.clear()
        return [clear_frame(self._sid())]

    def send_dtmf(self, digits: str) -> list[Frame]:
        """Exotel has no DTMF command on the stream: none (the core plays tones in-band)."""
        return []

    def hangup(self) -> list[Frame]:
        """No hang-up message: the core closes the WebSocket, which ends the Voicebot applet."""
        self._pending.clear()
        return []

    @property
    def buffered_bytes(self) -> int:
        """Outbound PCM held until it makes a whole chunk (or a mark/flush sends it)."""
        return len(self._pending)
